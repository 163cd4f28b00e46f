import json

import httpx
from sse import split_lines, sse_lines


def test_unicode_line_separators_inside_json_do_not_split_a_line():
    event = json.dumps({"choices": [{"text": "a\x85b\u2028c\u2029d"}]}, ensure_ascii=False)
    body = f"data: {event}\r\n\r\ndata: [DONE]\n\n".encode()
    # httpx's own iter_lines() cuts this event in two (the reason for the helper).
    assert len(list(httpx.Response(200, content=body).iter_lines())) > 4
    for cut in range(1, len(body)):  # chunk boundaries anywhere, even inside a UTF-8 sequence
        lines = list(split_lines([body[:cut], body[cut:]]))
        assert lines == [f"data: {event}", "", "data: [DONE]", ""]
        assert json.loads(lines[0][6:])["choices"][0]["text"] == "a\x85b\u2028c\u2029d"


def test_sse_lines_reads_a_response_and_keeps_an_unterminated_last_line():
    assert list(sse_lines(httpx.Response(200, content=b"data: 1\ndata: 2"))) == ["data: 1", "data: 2"]

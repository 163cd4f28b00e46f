import json

import httpx
from sse import sse_lines


def test_unicode_line_separators_inside_json_do_not_split_an_event():
    event = json.dumps({"choices": [{"text": "a\x85b\u2028c\u2029d"}]}, ensure_ascii=False)
    body = f"data: {event}\r\n\r\ndata: [DONE]\n\n".encode()
    # httpx's own iter_lines() cuts this event in two (the reason for the helper).
    assert len(list(httpx.Response(200, content=body).iter_lines())) > 4
    for cut in range(1, len(body)):  # chunk boundaries anywhere, even inside a UTF-8 sequence
        lines = list(sse_lines(httpx.Response(200, content=iter([body[:cut], body[cut:]]))))
        assert lines == [f"data: {event}", "data: [DONE]"]
        assert json.loads(lines[0][6:])["choices"][0]["text"] == "a\x85b\u2028c\u2029d"


def test_comments_and_blank_lines_are_not_events():
    body = b": waiting for a replica\n\ndata: 1\n\n\n\ndata: [DONE]\n\n"
    assert list(sse_lines(httpx.Response(200, content=body))) == ["data: 1", "data: [DONE]"]

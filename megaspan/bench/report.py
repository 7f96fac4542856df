"""Bench results: statistics, ratios, the JSON document, Markdown tables and ``--compare``.

Torch-free, so ``megaspan bench --compare A.json B.json`` runs anywhere.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megaspan.errors import UserError

SCHEMA_VERSION = 1


class BenchFileError(UserError):
    """A ``--compare``/``--summary`` input that is missing or not a megaspan bench JSON."""


@dataclass
class Row:
    """One benchmarked model (a placement at a precision, ``stock`` or ``bare-loop``)."""

    model: str
    kind: str  # "megaspan" | "stock" | "bare-loop"
    placement: str  # the norm placement ("pre" for stock and bare-loop)
    precision: str
    backend: str  # "local" | "transformer_engine"
    times_s: list[float]
    tokens_per_step: int
    num_params: int
    flops_per_step: float
    step_time_s: float = 0.0
    iqr_s: float = 0.0
    min_s: float = 0.0
    tokens_per_s: float = 0.0
    ratio_to_pre: float | None = None
    ratio_to_stock: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    max_memory_gib: float | None = None
    final_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def median_iqr(times: list[float]) -> tuple[float, float]:
    """Median and inter-quartile range (q75 - q25, inclusive quantiles; 0 for < 2 samples)."""
    med = statistics.median(times)
    if len(times) < 2:
        return med, 0.0
    q = statistics.quantiles(times, n=4, method="inclusive")
    return med, q[2] - q[0]


def finalize(rows: list[Row], peak_tflops: dict[str, float | None], world_size: int = 1) -> list[Row]:
    """Fill the statistics and the ratios to ``pre`` and ``stock`` of the same precision.

    ``peak_tflops`` maps precision -> per-device peak (None = no MFU). FLOP/s are per device:
    the step's FLOPs divided by the step time and the number of devices.
    """
    for r in rows:
        r.step_time_s, r.iqr_s = median_iqr(r.times_s)
        r.min_s = min(r.times_s)
        r.tokens_per_s = r.tokens_per_step / r.step_time_s
        r.tflops = r.flops_per_step / r.step_time_s / world_size / 1e12
        peak = peak_tflops.get(r.precision)
        r.mfu = r.tflops / peak if peak else None
    for r in rows:
        ref = {x.kind if x.kind != "megaspan" else x.placement: x for x in rows if x.precision == r.precision}
        pre, stock = ref.get("pre"), ref.get("stock")
        r.ratio_to_pre = r.step_time_s / pre.step_time_s if pre else None
        r.ratio_to_stock = r.step_time_s / stock.step_time_s if stock else None
    return rows


def document(meta: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "meta": meta, "results": [asdict(r) for r in rows]}


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mem(r: dict[str, Any], spec: str) -> str:
    """Measured peak memory, with plan's estimate for the same config when it was computed."""
    est = (r.get("extra") or {}).get("plan_estimate_gib")
    return _fmt(r["max_memory_gib"], spec) + (f" (plan {est:{spec}})" if est is not None else "")


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown table, with the machine line above it."""
    meta = doc["meta"]
    load = meta.get("load_average") or {}
    lines = [
        f"megaspan bench, preset {meta.get('preset')}, {meta.get('device')}, "
        f"{meta.get('warmup')} warm-up + {meta.get('repeats')} repeats ({meta.get('schedule')}), "
        f"load average {load.get('before')} -> {load.get('after')}",
        "",
        "| model | precision | backend | step ms (median) | IQR ms | tokens/s | vs pre | vs stock "
        "| TFLOP/s | MFU | peak mem GiB |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    profiled = any("profile" in (r.get("extra") or {}) for r in doc["results"])
    if profiled:  # a column for the profile's normalization share (bench --profile)
        lines[2] += " norm share |"
        lines[3] += "--:|"
    for r in doc["results"]:
        line = (
            f"| {r['model']} | {r['precision']} | {r['backend']} | {r['step_time_s'] * 1e3:.1f} "
            f"| {r['iqr_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {_fmt(r['ratio_to_pre'], '.3f')} "
            f"| {_fmt(r['ratio_to_stock'], '.3f')} | {_fmt(r['tflops'], '.2f')} "
            f"| {_fmt(r['mfu'] * 100 if r['mfu'] is not None else None, '.1f')}"
            f"{'%' if r['mfu'] is not None else ''} | {_mem(r, '.2f')} |"
        )
        if profiled:
            share = ((r.get("extra") or {}).get("profile") or {}).get("norm_share")
            line += f" {_fmt(share * 100 if share is not None else None, '.1f')}{'%' if share is not None else ''} |"
        lines.append(line)
    return "\n".join(lines)


def load(path: str | Path, flag: str = "--compare") -> dict[str, Any]:
    """A bench JSON written by ``--json``; ``flag`` names the option in the one-line error."""
    p = Path(path)
    if not p.is_file():
        raise BenchFileError(f"{flag}: {p} does not exist (write one with megaspan bench --json FILE)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise BenchFileError(f"{flag}: {p} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or "results" not in doc or "meta" not in doc:
        raise BenchFileError(f"{flag}: {p} is not a megaspan bench result (no meta/results)")
    return doc


def compare(a: dict[str, Any], b: dict[str, Any], a_name: str = "A", b_name: str = "B") -> str:
    """Markdown table of B relative to A, row by row (models present in both runs).

    ``B/A time`` below 1 means B is faster. The ``vs pre``/``vs stock`` columns are each run's
    own ratios, so a change in overhead shows even when the machine's speed drifted between runs.
    """
    key = lambda r: (r["model"], r["precision"])  # noqa: E731
    rows_a = {key(r): r for r in a["results"]}
    lines = [
        f"A = {a_name} (load {a['meta'].get('load_average')}), B = {b_name} (load {b['meta'].get('load_average')})",
        "",
        "| model | precision | A step ms | B step ms | B/A time | A vs pre | B vs pre | A vs stock "
        "| B vs stock |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for rb in b["results"]:
        ra = rows_a.get(key(rb))
        if ra is None:
            continue
        lines.append(
            f"| {rb['model']} | {rb['precision']} | {ra['step_time_s'] * 1e3:.1f} | {rb['step_time_s'] * 1e3:.1f} "
            f"| {rb['step_time_s'] / ra['step_time_s']:.3f} | {_fmt(ra['ratio_to_pre'], '.3f')} "
            f"| {_fmt(rb['ratio_to_pre'], '.3f')} | {_fmt(ra['ratio_to_stock'], '.3f')} "
            f"| {_fmt(rb['ratio_to_stock'], '.3f')} |"
        )
    only = sorted({f"{m}/{p}" for m, p in rows_a} ^ {f"{r['model']}/{r['precision']}" for r in b["results"]})
    if only:
        lines += ["", f"in one run only: {', '.join(only)}"]
    return "\n".join(lines)


# The GPU targets of issue 10 (benchmark results, reported, never asserted in tests).
GPU_TARGETS = {"spannorm_vs_pre_bf16": 1.05, "pre_mfu_bf16_h100_1b": 0.45, "fp8_speedup": 1.3}


def summary(docs: list[tuple[str, dict[str, Any]]]) -> str:
    """One table over several bench results (``tools/gpu_check.sh``), plus the target checks.

    ``fp8 x`` is a row's tokens/s over the same model's bf16 tokens/s in the same run.
    """
    lines = [
        "| preset | model | precision | backend | step ms | tokens/s | TFLOP/s | MFU | vs pre | vs stock "
        "| fp8 x | peak mem GiB |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    checks: list[str] = []
    for name, doc in docs:
        preset = doc["meta"].get("preset", name)
        bf16 = {r["model"]: r for r in doc["results"] if r["precision"] == "bf16"}
        for r in doc["results"]:
            base = bf16.get(r["model"]) if r["precision"].startswith("fp8") else None
            speedup = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            mfu = r["mfu"] * 100 if r["mfu"] is not None else None
            lines.append(
                f"| {preset} | {r['model']} | {r['precision']} | {r['backend']} | {r['step_time_s'] * 1e3:.1f} "
                f"| {r['tokens_per_s']:.0f} | {_fmt(r['tflops'], '.1f')} | {_fmt(mfu, '.1f')} "
                f"| {_fmt(r['ratio_to_pre'], '.3f')} | {_fmt(r['ratio_to_stock'], '.3f')} "
                f"| {_fmt(speedup, '.2f')} | {_mem(r, '.1f')} |"
            )
            if speedup is not None:
                ok = speedup >= GPU_TARGETS["fp8_speedup"]
                checks.append(
                    f"{'PASS' if ok else 'MISS'} {preset} {r['model']} {r['precision']}: "
                    f"{speedup:.2f}x bf16 tokens/s (target >= {GPU_TARGETS['fp8_speedup']})"
                )
        span, pre = bf16.get("spannorm"), bf16.get("pre")
        if span and span["ratio_to_pre"] is not None:
            ok = span["ratio_to_pre"] <= GPU_TARGETS["spannorm_vs_pre_bf16"]
            checks.append(
                f"{'PASS' if ok else 'MISS'} {preset} spannorm bf16: {span['ratio_to_pre']:.3f}x pre step time "
                f"(target <= {GPU_TARGETS['spannorm_vs_pre_bf16']})"
            )
        if preset == "h100-1b" and pre and pre["mfu"] is not None:
            ok = pre["mfu"] >= GPU_TARGETS["pre_mfu_bf16_h100_1b"]
            checks.append(
                f"{'PASS' if ok else 'MISS'} h100-1b pre bf16 MFU {pre['mfu'] * 100:.1f}% "
                f"(target >= {GPU_TARGETS['pre_mfu_bf16_h100_1b'] * 100:.0f}%)"
            )
    devices = sorted({str(doc["meta"].get("device")) for _, doc in docs})
    head = [f"devices: {', '.join(devices)}", ""]
    return "\n".join(head + lines + ([""] + checks if checks else []))

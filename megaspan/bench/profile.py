"""``megaspan bench --profile DIR``: one extra step per model under ``torch.profiler``.

Why: a ratio says *that* a placement costs more than ``pre``; the profile says *where*. The part
that a placement's equations make inherent is the time in normalization kernels (an extra norm
per sub-layer is the price of Peri-LN or HybridNorm), so every profiled row records
``norm_share``: the self time of normalization ops (forward and backward) over the self time of
all ops in the step. The rest of a gap (Python work, copies, casts) shows in the op table.

Per model it writes ``<model>-<precision>.txt`` (ops sorted by self time) and
``<model>-<precision>.trace.json`` (open in Perfetto or chrome://tracing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Substrings of the op names that normalization runs as (lower-cased): torch's layer_norm /
# rms_norm and their backward, Apex/TE fused norms on GPU.
NORM_OP_MARKERS = ("layer_norm", "layernorm", "rms_norm", "rmsnorm")
TOP_OPS = 12


def is_norm_op(name: str) -> bool:
    name = name.lower()
    return any(marker in name for marker in NORM_OP_MARKERS)


def summarize(events: list[tuple[str, float]]) -> dict[str, Any]:
    """``events``: (op name, self time in µs) per op kind. Returns the norm share and the top ops."""
    total = sum(t for _, t in events)
    norm = sum(t for name, t in events if is_norm_op(name))
    top = sorted(events, key=lambda e: e[1], reverse=True)[:TOP_OPS]
    return {
        "self_time_ms": total / 1e3,
        "norm_time_ms": norm / 1e3,
        "norm_share": norm / total if total > 0 else None,
        "top_ops": [{"op": name, "self_ms": round(t / 1e3, 3)} for name, t in top],
    }


def profile_step(step, out_dir: Path, label: str, cuda: bool) -> dict[str, Any]:
    """Run ``step()`` once under the profiler; write the op table and trace; return the summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    # On GPU the kernels' device time is what the step waits for; on CPU the ops' own CPU time.
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"{label}.txt"
    table.write_text(averages.table(sort_by=sort_by, row_limit=40) + "\n")
    trace = out_dir / f"{label}.trace.json"
    prof.export_chrome_trace(str(trace))
    result = summarize([(e.key, float(getattr(e, attr, 0.0) or 0.0)) for e in averages])
    result.update(table=str(table), trace=str(trace))
    return result

"""``megaspan bench --profile DIR``: one extra step per model under ``torch.profiler``.

Why: a ratio says *that* a placement costs more than ``pre``; the profile says *where*. The part
that a placement's equations make inherent is the time spent normalizing (an extra norm per
sub-layer is the price of Peri-LN or HybridNorm), so every profiled row records ``norm_share``:
the time of the normalization layers, forward and backward, over the self time of all ops in
the step. The rest of a gap (Python work, copies, casts, extra residual adds) shows in the op
table.

How the norm time is found, whatever the norm's implementation (torch's RMSNorm on CPU runs as
pow/mean/rsqrt/mul, which no op name gives away): every outermost normalization module runs
inside a ``record_function`` range; its forward time is the ranges' time, and its backward time
is that of the autograd nodes whose forward op ran inside a range (matched by the autograd
sequence number and forward thread). Without module hooks (a GPU kernel trace), fused norm
kernels are recognised by name instead.

Per model it writes ``<model>-<precision>.txt`` (ops sorted by self time) and
``<model>-<precision>.trace.json`` (open in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import bisect
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


NORM_RANGE = "megaspan::norm"
_BACKWARD = "autograd::engine::evaluate_function: "


def is_norm_module(module) -> bool:
    """A normalization layer: torch's, Megatron's, TE's or a placement's wrapper around one."""
    import torch

    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return True
    name = type(module).__name__
    return name.endswith("Norm") or "LayerNorm" in name or "RMSNorm" in name


def mark_norms(modules) -> list:
    """Run every outermost norm module under ``modules`` inside a :data:`NORM_RANGE` range;
    returns the hook handles (``remove()`` them after profiling)."""
    from torch.profiler import record_function

    handles, open_ranges = [], []

    def enter(module, args):
        ctx = record_function(NORM_RANGE)
        ctx.__enter__()
        open_ranges.append(ctx)

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for root in modules:
        marked: list[str] = []
        for name, module in root.named_modules():
            if any(name.startswith(m + ".") for m in marked) or not is_norm_module(module):
                continue
            marked.append(name)
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def norm_time_from_ranges(events) -> tuple[float, int]:
    """(µs of normalization forward + backward, number of norm ranges) from profiler events."""
    ranges = [e for e in events if e.name == NORM_RANGE]
    if not ranges:
        return 0.0, 0
    by_thread: dict[int, list[tuple[float, float]]] = {}
    for r in ranges:
        by_thread.setdefault(r.thread, []).append((r.time_range.start, r.time_range.end))
    starts = {t: sorted(spans) for t, spans in by_thread.items()}
    keys = {t: [a for a, _ in spans] for t, spans in starts.items()}

    def inside(e) -> bool:
        spans = starts.get(e.thread)
        if not spans:
            return False
        i = bisect.bisect_right(keys[e.thread], e.time_range.start) - 1
        return i >= 0 and e.time_range.end <= spans[i][1]

    forward_ops = {
        (e.thread, e.sequence_nr)
        for e in events
        if e.sequence_nr >= 0 and e.name != NORM_RANGE and not e.name.startswith(_BACKWARD) and inside(e)
    }
    forward = sum(r.cpu_time_total for r in ranges)
    backward = sum(
        e.cpu_time_total
        for e in events
        if e.name.startswith(_BACKWARD) and (e.fwd_thread, e.sequence_nr) in forward_ops
    )
    return forward + backward, len(ranges)


def profile_step(step, out_dir: Path, label: str, cuda: bool, modules=()) -> dict[str, Any]:
    """Run ``step()`` once under the profiler (norms of ``modules`` marked); write the op table and
    the trace; return the summary."""
    import os

    import torch
    from torch.profiler import ProfilerActivity, profile

    # Kineto's C++ logger prints start/stop lines and a CUDA probe error on CPU machines.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    handles = [] if cuda else mark_norms(modules)
    try:
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    averages = prof.key_averages()
    # On GPU the kernels' device time is what the step waits for; on CPU the ops' own CPU time.
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"{label}.txt"
    table.write_text(averages.table(sort_by=sort_by, row_limit=40) + "\n")
    trace = out_dir / f"{label}.trace.json"
    prof.export_chrome_trace(str(trace))
    # The total keeps the ranges' own time (the norm modules' Python work between ops): it is
    # part of both the step and the norm time.
    result = summarize([(e.key, float(getattr(e, attr, 0.0) or 0.0)) for e in averages])
    result["top_ops"] = [op for op in result["top_ops"] if op["op"] != NORM_RANGE]
    if handles:
        norm_us, count = norm_time_from_ranges(prof.events())
        total_us = result["self_time_ms"] * 1e3
        result.update(
            norm_time_ms=norm_us / 1e3,
            norm_share=norm_us / total_us if total_us > 0 else None,
            norm_calls=count,
            norm_method="module ranges + autograd sequence numbers",
        )
    else:
        result["norm_method"] = "op names"
    result.update(table=str(table), trace=str(trace))
    return result

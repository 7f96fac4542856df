"""The plan as a text table (``megaspan plan``; ``--json`` uses :meth:`Plan.to_dict` instead)."""

from __future__ import annotations

import math

from megaspan.plan.planner import GIB, Plan


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _layer_range(layers: list[int]) -> str:
    if not layers:
        return "-"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [math.inf]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(runs)


def format_plan(p: Plan) -> str:
    lay = p.layout
    vpp = f" x VPP{lay.vpp}" if lay.vpp else ""
    lines = [
        f"layout: {lay.world_size} GPUs = TP{lay.tp} x PP{lay.pp}{vpp} x CP{lay.cp} x DP{lay.dp}; "
        f"experts: EP{lay.ep} x ETP{lay.etp} x expert-DP{lay.expert_dp}; "
        f"{lay.num_microbatches} micro-batches per step per DP rank; padded vocab {p.vocab_size}",
        "per GPU (every TP rank and EP rank of a stage holds the same counts):",
        f"{'stage':>5} {'rank':>6} {'layers':>14} {'params':>9} {'dense':>9} {'expert':>9} "
        f"{'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total GiB':>9}",
    ]
    for s in p.stages:
        mem = s.memory
        lines.append(
            f"{s.stage:>5} {s.rank:>6} {_layer_range(s.shard.layers):>14} {_fmt_count(s.shard.total):>9} "
            f"{_fmt_count(s.shard.dense):>9} {_fmt_count(s.shard.expert):>9} "
            + " ".join(f"{v / GIB:>8.2f}" for v in (mem.weights, mem.grads, mem.optimizer, mem.activations))
            + f" {mem.total / GIB:>9.2f}"
        )
    verdict = "==" if p.sharded_total == p.single_device_params else "!="
    lines.append(
        f"model parameters: sum over distinct shards {p.sharded_total:,} {verdict} "
        f"single-device build {p.single_device_params:,}"
    )
    lines.append(
        "memory is an estimate: weights/grads/Adam from the counts, activations after Korthikanti et al. "
        "2022 (fused attention, peak 1F1B depth); allocator overhead and buffers are not included"
    )
    return "\n".join(lines)

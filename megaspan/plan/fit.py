"""Does a plan fit the GPUs? Per-stage estimates against device memory, and the smallest
TP/PP/EP change that fits.

Device memory is what ``--gpu-memory`` says, or the named GPU type's (:data:`GPU_MEMORY_GIB`).
The estimate (:mod:`megaspan.plan.memory`) leaves out the CUDA context, NCCL buffers and
allocator fragmentation, so a stage counts as fitting only below ``headroom`` (default 90 %) of
the device.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from megaspan.config.schema import MegaspanConfig
from megaspan.errors import ConfigError, UserError

GIB = 2**30

# Memory per GPU (GiB as the driver reports it: H100 SXM 80 GB -> 79.6 GiB usable by CUDA).
GPU_MEMORY_GIB: dict[str, float] = {
    "H100": 79.6,
    "H100-NVL": 93.0,
    "H200": 139.8,
    "GH200": 94.5,
    "A100": 79.2,
    "A100-40GB": 39.4,
    "B200": 178.0,
    "L40S": 44.4,
}
DEFAULT_GPU = "H100"
HEADROOM = 0.9


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '80' (GiB) or '81920MiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 80GB or 81920MiB")
    unit = (m.group(2) or "GiB").lower()
    scale = {"gib": GIB, "gb": 1e9, "mib": 2**20, "mb": 1e6, "tib": 2**40, "tb": 1e12}[unit]
    return float(m.group(1)) * scale


def device_memory(gpu: str | None, gpu_memory: str | None) -> tuple[float, str]:
    """(bytes, description) from ``--gpu-memory`` or the ``--gpu`` type."""
    if gpu_memory:
        return parse_memory(gpu_memory), gpu_memory
    name = (gpu or DEFAULT_GPU).upper()
    if name not in GPU_MEMORY_GIB:
        raise ConfigError(
            f"--gpu {gpu}: unknown GPU type (known: {', '.join(GPU_MEMORY_GIB)}); or give --gpu-memory SIZE"
        )
    return GPU_MEMORY_GIB[name] * GIB, f"{name} ({GPU_MEMORY_GIB[name]:g} GiB)"


@dataclass
class Fit:
    budget: float  # bytes usable by the estimate (device memory x headroom)
    device: str
    over: list[tuple[int, float]]  # (stage, estimated bytes) above the budget
    suggestion: str | None = None  # dotted overrides of the smallest change that fits
    suggestion_peak: float | None = None

    @property
    def fits(self) -> bool:
        return not self.over


def check(p, budget: float, device: str) -> Fit:
    """Stages of plan ``p`` whose estimate exceeds ``budget`` bytes."""
    over = [(s.stage, s.memory.total) for s in p.stages if s.memory.total > budget]
    return Fit(budget=budget, device=device, over=over)


def _candidates(cfg: MegaspanConfig) -> list[tuple[str, int]]:
    """(parallel key, new size): x2, x4, x8 of TP, PP and (for MoE) EP, smallest change first."""
    par = cfg.parallel
    sizes = [
        ("tensor_model_parallel_size", par.tensor_model_parallel_size),
        ("pipeline_model_parallel_size", par.pipeline_model_parallel_size),
    ]
    if cfg.model.moe.num_experts:
        sizes.append(("expert_model_parallel_size", par.expert_model_parallel_size))
    return [(key, size * f) for f in (2, 4, 8) for key, size in sizes]


def suggest(cfg: MegaspanConfig, world_size: int, fit: Fit, planner) -> Fit:
    """Fill ``fit.suggestion`` with the first candidate layout whose every stage fits.

    ``planner(cfg, world_size)`` is :func:`megaspan.plan.plan` (a parameter so tests can count
    calls). Candidates that the layout rules refuse (not dividing the world, heads, experts or
    layers) are skipped.
    """
    for key, size in _candidates(cfg):
        trial = copy.deepcopy(cfg)
        setattr(trial.parallel, key, size)
        if key == "tensor_model_parallel_size" and size > 1 and cfg.model.moe.num_experts:
            trial.parallel.sequence_parallel = True  # Megatron requires SP with TP and MoE
        try:
            p = planner(trial, world_size)
        except UserError:
            continue
        peak = max(s.memory.total for s in p.stages)
        if peak <= fit.budget:
            extra = (
                " parallel.sequence_parallel=true"
                if trial.parallel.sequence_parallel != cfg.parallel.sequence_parallel
                else ""
            )
            fit.suggestion = f"parallel.{key}={size}{extra}"
            fit.suggestion_peak = peak
            return fit
    return fit


def format_fit(fit: Fit) -> str:
    budget = f"{fit.budget / GIB:.1f} GiB ({HEADROOM:.0%} of {fit.device})"
    if fit.fits:
        return f"memory: every stage fits in {budget}"
    lines = [
        f"memory: stage {stage} needs an estimated {total / GIB:.1f} GiB per GPU > {budget}"
        for stage, total in fit.over
    ]
    if fit.suggestion:
        lines.append(
            f"smallest TP/PP/EP change that fits: {fit.suggestion} "
            f"(estimated peak {fit.suggestion_peak / GIB:.1f} GiB per GPU)"
        )
    else:
        lines.append(
            "no TP/PP/EP change up to x8 fits at this world size: add GPUs, "
            "parallel.use_distributed_optimizer=true, or parallel.recompute_granularity=full"
        )
    return "\n".join(lines)

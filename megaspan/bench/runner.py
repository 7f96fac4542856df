"""``megaspan bench``'s library entry point: :func:`run_bench`.

Timing protocol: every model is built, then each gets ``warmup`` untimed steps, then ``repeats``
timed steps in round-robin order (model A step, model B step, ..., A, B, ...), so machine noise
(a shared CPU, thermal drift) lands on all models alike; the statistic is the median with its
IQR. On CUDA each step is timed with CUDA events after a device synchronize, and the models run
one after another instead (``schedule='sequential'``): several 1B-parameter models with their
optimizer state do not fit on one GPU together, and a GPU's step time hardly drifts.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaspan.bench import report
from megaspan.bench.presets import common_overrides, get_preset
from megaspan.config import derived
from megaspan.errors import BackendError, ConfigError

PRECISIONS: dict[str, tuple[str, ...]] = {
    "fp32": ("precision.dtype=fp32", "precision.fp8=null"),
    "bf16": ("precision.dtype=bf16", "precision.fp8=null"),
    "fp8-tensorwise": ("precision.dtype=bf16", "precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"),
    "fp8-delayed": ("precision.dtype=bf16", "precision.fp8=hybrid", "precision.fp8_recipe=delayed"),
}
BASELINES = ("stock", "bare-loop")


@dataclass
class BenchOptions:
    preset: str = "cpu-small"
    placements: list[str] | None = None  # None = the preset's list (or every placement)
    precisions: list[str] | None = None  # None = the preset's precision
    repeats: int | None = None
    warmup: int | None = None
    baselines: bool = True  # time stock and bare-loop too
    schedule: str = "auto"  # "auto" | "round-robin" | "sequential"
    peak_tflops: float | None = None
    profile_dir: str | None = None  # one extra profiled step per model (megaspan.bench.profile)
    overrides: list[str] = field(default_factory=list)


def _placements(opts: BenchOptions, preset) -> list[str]:
    from megaspan.norms import available

    known = available()
    names = opts.placements or list(preset.placements) or list(known)
    for name in names:
        if name in BASELINES:
            raise ConfigError(
                f"--placements {name}: stock and bare-loop are always timed; list placements only"
            )
        if name not in known:
            raise ConfigError(f"--placements: unknown placement '{name}' (known: {', '.join(known)})")
    if "pre" not in names:
        names = ["pre", *names]  # every ratio is against pre
    return list(dict.fromkeys(names))


def _precisions(opts: BenchOptions, preset, cuda: bool, te: bool) -> list[str]:
    names = opts.precisions or [preset.precision]
    for name in names:
        if name not in PRECISIONS:
            raise ConfigError(f"--precision {name}: use one of {', '.join(PRECISIONS)}")
        if name.startswith("fp8") and not (cuda and te):
            raise BackendError(
                f"--precision {name} needs a CUDA GPU with Transformer Engine (use the docker/ image), "
                "or bench fp32/bf16"
            )
    return list(dict.fromkeys(names))


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "megatron-core", "megaspan", "transformer-engine", "transformer_engine"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    import torch

    out["cuda"] = torch.version.cuda
    return out


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


_OVERRIDES: dict[int, list[str]] = {}
"""The override list each bench config was loaded from (for ``plan`` in a subprocess)."""


def plan_estimate_gib(cfg, world: int) -> float | None:
    """``megaspan plan``'s per-GPU memory estimate (stage 0) for ``cfg``, in GiB, or None.

    Runs in a subprocess: the planner builds fake process groups, which must not meet this
    process's real ones.
    """
    import json
    import subprocess
    import sys

    overrides = _OVERRIDES.get(id(cfg))
    if overrides is None:
        return None
    code = (
        "import json, sys; from megaspan.config.loader import load_config; from megaspan.plan import plan; "
        "p = plan(load_config(None, sys.argv[2:]), int(sys.argv[1])); "
        "print(json.dumps(p.stages[0].memory.total / 2**30))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(world), *overrides], capture_output=True, text=True, timeout=600
        )
        return float(json.loads(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 else None
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def build_config(preset_name: str, precision: str, overrides: list[str], world_size: int = 1):
    """The bench config for one precision: common settings, preset, precision, user overrides."""
    from megaspan.config.loader import load_config

    preset = get_preset(preset_name)
    extra: list[str] = []
    if preset.expert_parallel_from_world and not any(
        o.startswith("parallel.expert_model_parallel_size=") for o in overrides
    ):
        extra.append(f"parallel.expert_model_parallel_size={world_size}")
    full = [*common_overrides(), *preset.overrides, *PRECISIONS[precision], *extra, *overrides]
    cfg = load_config(None, full)
    _OVERRIDES[id(cfg)] = full
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size must be set for megaspan bench (it uses synthetic tokens)")
    return cfg


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Build, time and report every model; returns the JSON document (see report.document)."""
    import torch
    import torch.distributed as dist

    from megaspan import runtime
    from megaspan.bench.flops import peak_tflops
    from megaspan.bench.models import SyntheticTokens
    from megaspan.models import te_available
    from megaspan.training.build import init_megatron
    from megaspan.training.setup import check_schedule

    preset = get_preset(opts.preset)
    cuda = torch.cuda.is_available()
    placements = _placements(opts, preset)
    precisions = _precisions(opts, preset, cuda, te_available())
    warmup = preset.warmup if opts.warmup is None else opts.warmup
    repeats = preset.repeats if opts.repeats is None else opts.repeats
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"--repeats must be >= 1 and --warmup >= 0 (got {repeats}, {warmup})")
    schedule = opts.schedule if opts.schedule != "auto" else ("sequential" if cuda else "round-robin")
    if schedule not in ("round-robin", "sequential"):
        raise ConfigError(f"--schedule {opts.schedule}: use auto, round-robin or sequential")

    world = dist.get_world_size() if dist.is_initialized() else runtime.env_from_launcher().world_size
    steps_needed = warmup + repeats + 2
    overrides = [*opts.overrides, f"training.steps={max(steps_needed, 10)}"]
    cfgs: dict[tuple[str, str], Any] = {}
    for p in precisions:  # every config is built and checked before any model is
        for name in placements:
            cfg = build_config(opts.preset, p, [*overrides, f"model.norm_placement={name}"], world)
            check_schedule(cfg)
            _validate(cfg, world)
            cfgs[p, name] = cfg
    # Every user-input check is done: only now touch process groups (nothing to clean up above).
    owns_group = not dist.is_initialized()
    runtime.setup_cpu()  # no-op with a GPU
    runtime.init_process_group()
    device = runtime.device()
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    load_before = _load()
    rows: list[report.Row] = []
    timing = _Timing(warmup, repeats, schedule, cuda, opts.profile_dir)
    try:
        for precision in precisions:
            cfg = cfgs[precision, "pre"]
            init_megatron(cfg)  # seeds, groups, micro-batch calculator: as megaspan train
            dataset = SyntheticTokens(cfg.model.seq_length, cfg.model.vocab_size, cfg.training.seed)
            names = [*placements, *(BASELINES if opts.baselines else ())]
            rows += _time_models(
                names, lambda name, p=precision: cfgs[p, name], dataset, device, precision, timing
            )
    finally:
        runtime.destroy() if owns_group else None
    if cuda:
        # Measured peak next to the plan's estimate for the same config, so the estimate's error is known.
        for row in rows:
            name = row.placement
            row.extra["plan_estimate_gib"] = plan_estimate_gib(cfgs[row.precision, name], world)
    load_after = _load()
    peaks = {p: (opts.peak_tflops or peak_tflops(device_name if cuda else None, p)) for p in precisions}
    report.finalize(rows, peaks, world)
    meta = {
        "preset": opts.preset,
        "precisions": precisions,
        "placements": placements,
        "warmup": warmup,
        "repeats": repeats,
        "schedule": schedule,
        "world_size": world,
        "device": device_name,
        # training.deterministic as these runs resolved it (None = off on GPU): a deterministic
        # GPU number is not comparable with a fast one.
        "deterministic": sorted({derived.deterministic(c, cuda) for c in cfgs.values()}),
        "machine": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": _versions(),
        "load_average": {"before": load_before, "after": load_after},
        "peak_tflops": peaks,
        "overrides": list(opts.overrides),
        "profile_dir": opts.profile_dir,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return report.document(meta, rows)


def _validate(cfg, world: int) -> None:
    """The project's data-free checks (layout, backend, precision), as ``megaspan train`` runs them."""
    from megaspan.config.validate import validate
    from megaspan.models import detect_capabilities

    validate(cfg, world, detect_capabilities())


def _loss(value) -> float | None:
    """A step's loss: a float, a StepResult (lazy ``loss``) or None (bare loop)."""
    if value is None:
        return None
    return float(getattr(value, "loss", value))


def _timed(step, cuda: bool) -> tuple[float, object]:
    """(seconds, step's return) of one step; CUDA events around it on GPU, the wall clock on CPU."""
    import torch

    if not cuda:
        t0 = time.perf_counter()
        loss = step()
        return time.perf_counter() - t0, loss
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, loss


@dataclass(frozen=True)
class _Timing:
    """How every model of a run is timed (see the module doc)."""

    warmup: int
    repeats: int
    schedule: str  # "round-robin" | "sequential"
    cuda: bool
    profile_dir: str | None  # one extra profiled step per model (megaspan.bench.profile)


def _time_models(names, cfg_for, dataset, device, precision: str, timing: _Timing) -> list[report.Row]:
    """Build ``names`` (``cfg_for(name)`` gives each one's config) and time them."""
    import torch

    from megaspan.bench.flops import config_step_flops
    from megaspan.bench.models import build_candidate
    from megaspan.bench.profile import profile_step

    cfg = cfg_for("pre")
    tokens = cfg.training.global_batch_size * cfg.model.seq_length
    warmup, repeats, cuda, profile_dir = timing.warmup, timing.repeats, timing.cuda, timing.profile_dir
    rows: dict[str, report.Row] = {}
    peak_mem: dict[str, float] = {}

    def make(name):
        cand = build_candidate(name, cfg_for, dataset, cfg.model.vocab_size, device)
        rows[name] = report.Row(
            model=name,
            kind=cand.kind,
            placement=cand.placement,
            precision=precision,
            backend=cand.backend,
            times_s=[],
            tokens_per_step=tokens,
            num_params=cand.num_params,
            flops_per_step=config_step_flops(cfg, cand.padded_vocab),
        )
        return cand

    def one(cand, timed: bool) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, loss = _timed(cand.step, cuda)
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            peak_mem[cand.name] = max(peak_mem.get(cand.name, 0.0), peak)
        if timed:
            rows[cand.name].times_s.append(seconds)
            rows[cand.name].final_loss = _loss(loss)  # after the clock stopped

    def profiled(cand) -> None:
        """One more, untimed step under the profiler (after the timed ones: its overhead
        never lands in the medians)."""
        if profile_dir is not None:
            label = f"{cand.name}-{precision}"
            modules = cand.objs.model if cand.objs is not None else ()
            rows[cand.name].extra["profile"] = profile_step(
                cand.step, Path(profile_dir), label, cuda, modules=modules
            )

    if timing.schedule == "round-robin":
        cands = [make(n) for n in names]
        for _ in range(warmup):
            for c in cands:
                one(c, timed=False)
        for _ in range(repeats):
            for c in cands:
                one(c, timed=True)
        for c in cands:
            profiled(c)
            c.close()
    else:
        for n in names:
            c = make(n)
            for _ in range(warmup):
                one(c, timed=False)
            for _ in range(repeats):
                one(c, timed=True)
            profiled(c)
            c.close()
            del c
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    for name, peak in peak_mem.items():
        rows[name].max_memory_gib = peak
    return [rows[n] for n in names]

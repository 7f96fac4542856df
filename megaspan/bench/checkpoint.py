"""``megaspan bench --checkpoint DIR``: how long a save holds the training loop, sync vs async.

Protocol, on the preset's model with placement ``pre`` and synthetic tokens:

1. ``warmup`` training steps, one untimed synchronous and one untimed background save (first-touch
   costs: file creation, page cache, lazy imports, the background group), then ``repeats``
   rounds. Each round does, in this order:
2. a **synchronous** save (``checkpoint.async_save=false``): blocked = the whole
   :func:`save_checkpoint` call (finite check, state dict, write, fsync, checksums, commit);
3. ``steps`` training steps with no save in flight (the step time without a save);
4. an **asynchronous** save: blocked = the call up to its return (finite check, state dict,
   DCP's plan, the copy of every tensor to host memory) plus the commit at the first step
   boundary after the write finished (rename, ``latest``, pruning); training steps run while the
   thread writes, and their times are the cost the write imposes on training (on a CPU the writer
   thread competes for the same cores; on a GPU node the copy is device-to-host and the write is
   host I/O).

Each save commits into ``DIR`` like a training run's (``keep_last=1``, so the disk holds one
checkpoint plus the one being written). The statistic is the median over rounds with the IQR.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from megaspan.errors import ConfigError, RunDirError


def _dir_error(directory: Path) -> str | None:
    """Why ``directory`` cannot hold the bench's checkpoints (None = it can)."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"--checkpoint {directory}: {probe} is not a directory; pass a directory path"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"--checkpoint {directory}: {probe} is not writable; pass a writable directory"
    if directory.exists() and any(directory.iterdir()):
        return (
            f"--checkpoint {directory}: the directory is not empty (the bench writes and deletes "
            "checkpoints there); pass a new or empty directory"
        )
    return None


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "iqr": None, "n": 0}
    qs = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "iqr": qs[2] - qs[0], "n": len(values), "values": values}


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_checkpoint_bench(
    preset: str,
    precision: str,
    directory: str,
    *,
    repeats: int = 3,
    warmup: int = 1,
    steps: int = 3,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Time sync and async saves of the preset's ``pre`` model into ``directory`` (see the
    module doc); returns the JSON document :func:`markdown` prints."""
    import torch

    from megaspan import runtime
    from megaspan.bench.models import SyntheticTokens, build_candidate
    from megaspan.bench.runner import _load, _versions, build_config
    from megaspan.training import checkpoint as ck
    from megaspan.training.build import init_megatron
    from megaspan.training.setup import check_schedule

    out = Path(directory).resolve()
    if repeats < 1 or warmup < 0 or steps < 1:
        raise ConfigError(
            f"--repeats and steps must be >= 1, --warmup >= 0 (got {repeats}, {steps}, {warmup})"
        )
    if (problem := _dir_error(out)) is not None:
        raise RunDirError(problem)
    from megaspan.bench.presets import get_preset
    from megaspan.bench.runner import BenchOptions, _precisions
    from megaspan.models import te_available

    cuda = torch.cuda.is_available()
    [precision] = _precisions(BenchOptions(precisions=[precision]), get_preset(preset), cuda, te_available())
    existed = out.exists()
    total_steps = warmup + repeats * (3 * steps + 64) + 8
    cfg = build_config(
        preset, precision, [*(overrides or []), "model.norm_placement=pre", f"training.steps={total_steps}"]
    )
    check_schedule(cfg)
    owns_group = not torch.distributed.is_initialized()
    runtime.setup_cpu()
    runtime.init_process_group()
    device = runtime.device()
    load_before = _load()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    step_no = 0
    sync_blocked, async_blocked, async_start, async_commit, write_s = [], [], [], [], []
    quiet_steps, writing_steps, sizes = [], [], []
    try:
        init_megatron(cfg)
        dataset = SyntheticTokens(cfg.model.seq_length, cfg.model.vocab_size, cfg.training.seed)
        cand = build_candidate("pre", lambda _: cfg, dataset, cfg.model.vocab_size, device)
        objs = cand.objs

        def train_step() -> float:
            nonlocal step_no
            sync()
            t0 = time.perf_counter()
            cand.step()
            sync()
            step_no += 1
            return time.perf_counter() - t0

        def save(background: bool):
            return ck.save_checkpoint(
                out,
                ck.Progress(step_no, step_no),
                objs.chunks,
                objs.optimizer,
                objs.scheduler,
                {},
                1,
                background=background,
            )

        for _ in range(max(warmup, 1)):
            train_step()
        # Untimed, one of each: first-touch costs (files, page cache, imports) and the background
        # path's one-off ones (its gloo group, DCP's async machinery, the first host allocations).
        save(False)
        train_step()
        first = save(True)
        ck.finish_save(first)
        for _ in range(repeats):
            train_step()
            sync()
            t0 = time.perf_counter()
            path = save(False)
            sync_blocked.append(time.perf_counter() - t0)
            sizes.append(_size_bytes(path))
            quiet_steps += [train_step() for _ in range(steps)]

            sync()
            t0 = time.perf_counter()
            pending = save(True)
            started = time.perf_counter() - t0
            while True:  # the trainer's loop: a step, then the step-boundary poll
                writing_steps.append(train_step())
                if ck.save_done(pending):
                    break
            t1 = time.perf_counter()
            ck.finish_save(pending)
            commit = time.perf_counter() - t1
            write_s.append(time.perf_counter() - pending.started)
            async_start.append(started)
            async_commit.append(commit)
            async_blocked.append(started + commit)
    finally:
        if owns_group:
            runtime.destroy()
        for child in out.iterdir() if existed and out.is_dir() else ():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)

    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    return {
        "kind": "checkpoint",
        "preset": preset,
        "precision": precision,
        "num_params": cand.num_params,
        "checkpoint_bytes": statistics.median(sizes),
        "sync": {"blocked_s": _stats(sync_blocked)},
        "async": {
            "blocked_s": _stats(async_blocked),
            "start_s": _stats(async_start),
            "commit_s": _stats(async_commit),
            "write_s": _stats(write_s),
        },
        "step_s": {"no_save": _stats(quiet_steps), "during_async_write": _stats(writing_steps)},
        "repeats": repeats,
        "device": device_name,
        "directory": str(out),
        "load_average": {"before": load_before, "after": _load()},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "overrides": list(overrides or []),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def markdown(doc: dict[str, Any]) -> str:
    def s(stat: dict) -> str:
        if stat["median"] is None:
            return "-"
        return f"{stat['median']:.3f} s (IQR {stat['iqr']:.3f}, n={stat['n']})"

    sync_b, async_b = doc["sync"]["blocked_s"]["median"], doc["async"]["blocked_s"]["median"]
    ratio = f"{async_b / sync_b:.2f}x" if sync_b and async_b is not None else "-"
    lines = [
        f"checkpoint save, preset {doc['preset']} ({doc['num_params'] / 1e6:.1f}M params, {doc['precision']}), "
        f"{doc['checkpoint_bytes'] / 2**20:.0f} MiB a checkpoint, into {doc['directory']}, on {doc['device']}",
        "",
        "| save | training loop blocked per save | of which | write (background) |",
        "|---|---|---|---|",
        f"| sync | {s(doc['sync']['blocked_s'])} | all of it | - |",
        f"| async | {s(doc['async']['blocked_s'])} | copy {s(doc['async']['start_s'])}; "
        f"commit {s(doc['async']['commit_s'])} | {s(doc['async']['write_s'])} |",
        "",
        f"async / sync blocked time: {ratio}. Step time: {s(doc['step_s']['no_save'])} without a save, "
        f"{s(doc['step_s']['during_async_write'])} while a background write runs.",
        f"Load average before/after: {doc['load_average']['before']} / {doc['load_average']['after']}",
    ]
    return "\n".join(lines)

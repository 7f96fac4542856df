"""Removing abandoned saves and old checkpoints of the saving run."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from megaspan.training.checkpoint.layout import (
    _PREFIX,
    _TMP_PREFIX,
    LEGACY_LINEAGE,
    _latest_name,
    _step_of,
    lineage_of,
)


def remove_stale_tmp(ckpt_dir: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Delete ``tmp-*`` saves left by a crashed or killed run; call once at start (rank 0 only, or
    on every rank before any save: removing a missing directory is a no-op). Logs one line per
    removed directory through ``log`` (default: stderr). Returns what it removed."""
    removed = []
    for tmp in sorted(ckpt_dir.glob("tmp-*")) if ckpt_dir.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"removed {tmp}: an unfinished save of an earlier run"
        )
    return removed


def prune(ckpt_dir: Path, keep_last: int | None, keep: Path, lineage: str | None = None) -> None:
    """Delete abandoned ``tmp-`` saves and all but the newest ``keep_last`` checkpoints of
    ``lineage`` (None = :data:`LEGACY_LINEAGE`).

    Never deletes ``keep``, what ``latest`` names, a checkpoint of another lineage (another run
    that started over in this directory) or one whose commit record is unreadable (its lineage is
    unknown); ``diverged-*`` copies are not ``step_*`` checkpoints and are never pruned (there is
    at most one)."""
    for tmp in ckpt_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is None:
        return
    lineage = lineage or LEGACY_LINEAGE
    protected = {keep.name, _latest_name(ckpt_dir)}
    steps = sorted(
        (p for p in ckpt_dir.glob(f"{_PREFIX}*") if _step_of(p) is not None and lineage_of(p) == lineage),
        key=_step_of,
    )
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)

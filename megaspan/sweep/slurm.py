"""Submit a sweep's unfinished cells as one Slurm job array (``launch/slurm/sweep.sbatch``).

The cells are frozen to ``<runs>/sweep.<time>.json`` first, so editing the YAML later does not
change queued tasks; only cells that are not completed/diverged get an array index, so
resubmitting a half-done sweep runs what is left (and, for a sweep with ``best_lr_seeds``, the
stage-2 seeds of every group whose LR grid has finished) (preempted cells resume from their checkpoint:
train.sbatch requeues them and ``checkpoint.resume`` defaults to auto).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import megaspan
from megaspan.errors import BackendError
from megaspan.sweep.runner import default_runs_dir
from megaspan.sweep.spec import freeze
from megaspan.sweep.stages import stage2_cells
from megaspan.sweep.status import FINISHED, run_status


def checkout_root() -> Path:
    """The megaspan checkout holding launch/ (the sbatch scripts are not part of the wheel)."""
    home = os.environ.get("MEGASPAN_HOME")
    root = Path(home) if home else Path(megaspan.__file__).resolve().parents[1]
    if not (root / "launch" / "slurm" / "sweep.sbatch").is_file():
        raise BackendError(
            f"launch/slurm/sweep.sbatch not found under {root}; run from a megaspan checkout "
            "(pip install -e .) or export MEGASPAN_HOME=/path/to/megaspan"
        )
    return root


def array_spec(indices: Sequence[int], limit: int | None = None) -> str:
    """Compact Slurm array indices: [0,1,2,5,7,8] -> '0-2,5,7-8' (+ '%limit')."""
    parts: list[str] = []
    start = prev = None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts) + (f"%{limit}" if limit else "")


def submit(
    sweep: dict,
    runs_dir: Path | None = None,
    *,
    extra: Sequence[str] = (),
    sbatch_args: Sequence[str] = (),
    array_limit: int | None = None,
    dry_run: bool = False,
) -> tuple[list[str], str | None, list[int]]:
    """sbatch the unfinished cells; returns (command, job id or None when dry/nothing to do, indices)."""
    runs_dir = (Path(runs_dir) if runs_dir is not None else default_runs_dir(sweep)).resolve()
    # A two-stage sweep: stage 2's cells exist once their group's LR grid has finished, so a
    # submission after the grid's array job ends queues them (submit again when it is done).
    base = [c for c in sweep["cells"] if not c.get("stage2")]
    sweep = dict(sweep, cells=base)
    sweep["cells"] = base + stage2_cells(sweep, runs_dir)
    pending = [c["index"] for c in sweep["cells"] if run_status(runs_dir / c["name"]) not in FINISHED]
    root = checkout_root()
    frozen = runs_dir / f"sweep.{time.strftime('%Y%m%d-%H%M%S')}.json"
    cmd = [
        "sbatch",
        "--parsable",
        f"--array={array_spec(pending, array_limit)}",
        f"--job-name=megaspan-sweep-{sweep['name']}",
        f"--output={runs_dir}/slurm-logs/%x-%A_%a.out",
        "--requeue",
        "--signal=B:USR1@300",
        *sbatch_args,
        str(root / "launch" / "slurm" / "sweep.sbatch"),
        str(frozen),
        *extra,
    ]
    if dry_run or not pending:
        return cmd, None, pending
    if shutil.which("sbatch") is None:
        raise BackendError(
            "sbatch not found: --slurm needs a Slurm login node (or run the sweep locally without --slurm)"
        )
    freeze(sweep, frozen)
    (runs_dir / "slurm-logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MEGASPAN_HOME=str(root), MEGASPAN_SWEEP_DIR=str(runs_dir))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    if proc.returncode != 0:
        raise BackendError(
            f"{shlex.join(cmd[:3])} ... failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else None
    return cmd, job_id, pending

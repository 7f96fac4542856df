"""``megaspan sweep``: run a placement x depth x LR x seed sweep locally, or submit it to Slurm.

The work is in :mod:`megaspan.sweep` (expansion, local runner, Slurm submission); this module
only parses the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "sweep"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megaspan sweep`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        NAME,
        help="run a sweep of training runs (placements x depths x LRs x seeds), resumable",
        description="Run every cell of SWEEP (a sweep YAML/JSON file or a shipped sweep name such as "
        "cpu-proxy) as a `megaspan train` run, --jobs at a time, into --runs DIR (default "
        "runs/<sweep name>/<cell>): in --jobs long-lived worker processes (--isolate: one process "
        "per cell). A sweep with best_lr_seeds adds those seeds at each group's best grid LR as "
        "its grid finishes. Re-running skips cells whose summary.json says completed or diverged "
        "and resumes the others from their checkpoints.",
    )
    p.add_argument(
        "sweep",
        metavar="SWEEP.yaml",
        help="sweep file, or a shipped sweep name (cpu-proxy, cpu-small, paper-h100)",
    )
    p.add_argument(
        "--runs",
        metavar="DIR",
        type=Path,
        default=None,
        help="directory of the cell run dirs (default runs/<sweep name>)",
    )
    p.add_argument("--jobs", metavar="N", type=int, default=1, help="cells run at once (default 1)")
    p.add_argument(
        "--nproc",
        metavar="N",
        type=int,
        default=None,
        help="processes (GPUs) per cell; >1 launches each cell with torch.distributed.run",
    )
    p.add_argument(
        "--isolate",
        action="store_true",
        help="one `megaspan train` process per cell (default for single-process cells: --jobs "
        "long-lived workers that run cells one after another, saving ~12 s of start-up per cell)",
    )
    p.add_argument("--list", action="store_true", help="print the cells and their status, run nothing")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="also start the cells that failed under the runner (skipped otherwise; --list shows their exit code)",
    )
    p.add_argument(
        "--slurm",
        action="store_true",
        help="submit the unfinished cells as one Slurm job array (launch/slurm/sweep.sbatch)",
    )
    p.add_argument(
        "--sbatch-arg",
        metavar="ARG",
        action="append",
        default=[],
        help="extra sbatch option for --slurm, e.g. --sbatch-arg=--gpus-per-node=8 (repeatable)",
    )
    p.add_argument(
        "--array-limit", metavar="K", type=int, default=None, help="with --slurm: at most K cells at once"
    )
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch command only")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides appended to every cell (after the sweep's own); write them "
        "right after SWEEP, before the options",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shlex

    from megaspan.sweep import load_sweep
    from megaspan.sweep.runner import default_runs_dir, run_local, sweep_status
    from megaspan.sweep.spec import SweepError

    sweep = load_sweep(args.sweep)
    for item in args.overrides:
        if "=" not in item:
            raise SweepError(f"override {item!r} is not key=value (e.g. training.steps=100)")
    for flag, value in (("--jobs", args.jobs), ("--nproc", args.nproc)):
        if value is not None and value < 1:
            raise SweepError(f"{flag} must be >= 1, got {value}")
    # Validated against the world size only when it is known: a local run (--nproc, default 1),
    # or --list with --nproc; a Slurm job's world is the job's.
    world = None if args.slurm or (args.list and args.nproc is None) else (args.nproc or 1)
    check_cells(sweep, args.overrides, world)
    runs = args.runs if args.runs is not None else default_runs_dir(sweep)
    if args.list:
        from megaspan.sweep.stages import stage2_cells

        sweep = dict(sweep, cells=[c for c in sweep["cells"] if not c.get("stage2")])
        sweep["cells"] += stage2_cells(sweep, runs)
        for cell, status in sweep_status(sweep, runs):
            print(f"{cell['index']:4d}  {cell['name']:<40} {status:<11} {' '.join(cell['overrides'])}")
        stage2 = sweep.get("best_lr_seeds")
        note = f" (+ seeds {stage2} at each group's best LR once its grid has finished)" if stage2 else ""
        print(f"{len(sweep['cells'])} cells{note}, run dirs under {runs}")
        return 0
    if args.slurm:
        from megaspan.sweep.slurm import submit

        cmd, job, pending = submit(
            sweep,
            runs,
            extra=args.overrides,
            sbatch_args=args.sbatch_arg,
            array_limit=args.array_limit,
            dry_run=args.dry_run,
        )
        if not pending:
            print(f"sweep {sweep['name']}: every cell is completed or diverged; nothing to submit")
        elif job is None:
            print(shlex.join(cmd))
        else:
            print(
                f"sweep {sweep['name']}: submitted {len(pending)} of {len(sweep['cells'])} cells as "
                f"job array {job} (run dirs under {runs})"
            )
        return 0
    code, _ = run_local(
        sweep,
        runs,
        jobs=args.jobs,
        extra=args.overrides,
        nproc=args.nproc or 1,
        retry_failed=args.retry_failed,
        in_process=(args.nproc or 1) == 1 and not args.isolate,
    )
    return code


def check_cells(sweep: dict, extra: list[str], nproc: int | None) -> None:
    """Every cell's config loads (unknown keys, a missing recipe, wrong types) and, for a local
    run on ``nproc`` processes per cell, validates (bad values, layouts), so ``--list`` and the
    runner refuse a broken sweep before starting anything. Torch-free."""
    from megaspan.config import load_config, validate
    from megaspan.errors import UserError
    from megaspan.sweep.spec import SweepError, cell_args

    for cell in sweep["cells"]:
        args = cell_args(sweep, cell["index"])
        recipe = args[1] if args[:1] == ["--config"] else "default"
        overrides = [*args[2:], *extra] if args[:1] == ["--config"] else [*args, *extra]
        try:
            cfg = load_config(recipe, overrides)
            if nproc is not None:  # --slurm: the world size is the job's, not known here
                validate(cfg, nproc)
        except UserError as exc:
            raise SweepError(f"sweep {sweep['name']}, cell {cell['name']}: {exc}") from None

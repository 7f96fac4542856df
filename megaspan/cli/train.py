"""``megaspan train``: validate the whole config, then train (or resume) a run.

Order matters: the config is loaded and :func:`megaspan.config.validate` runs every data-free
check (layout, batch sizes, schedule, norm options, Transformer Engine/FP8/CUDA availability),
and the ``eval.downstream`` task names against lm-evaluation-harness's task list, before anything
touches the data cache or the run directory, so a bad input fails in one line and leaves no trace.
The work itself is :func:`megaspan.training.build.train`.
"""

from __future__ import annotations

import argparse
import sys

NAME = "train"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        NAME,
        help="train (or resume) a model",
        description="Train a model. Settings come from the defaults, then --config, then "
        "dotted overrides such as model.num_layers=24 optimizer.lr=3e-4.",
    )
    p.add_argument(
        "--config",
        metavar="RECIPE",
        default="default",
        help="YAML recipe: a path or a shipped name (default, tiny); default: default",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved config, then exit without training",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=run, fast_exit=True)


def run(args: argparse.Namespace) -> int:
    from megaspan.config import config_to_dict, load_config, validate
    from megaspan.models import detect_capabilities  # torch + Megatron: fine, this is the train path
    from megaspan.runtime.distributed import env_from_launcher

    cfg = load_config(args.config, args.overrides)
    validate(cfg, env_from_launcher().world_size, detect_capabilities())
    if cfg.eval.downstream.tasks:  # lm-eval's task list: unknown names fail here, before any write
        from megaspan.evaluate.harness import check_downstream_tasks

        check_downstream_tasks(cfg.eval.downstream)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from megaspan.launchers import stop_with_launchers
    from megaspan.runtime import freeze_imports, setup_cpu
    from megaspan.training.build import train

    if getattr(args, "exiting", False):
        stop_with_launchers()  # kill -9 of torchrun.sh / torchrun / megaspan sweep stops this run too
        # A process of its own (not an in-process caller's): torch and Megatron are imported and
        # nothing is built yet, so they leave the garbage collector's scans for good.
        freeze_imports()

    setup_cpu()  # Megatron-Core's CUDA sites emulated on a CPU-only machine; a no-op with CUDA
    try:
        return train(cfg, exiting=getattr(args, "exiting", False))
    except Exception as exc:
        line = lost_peer_line(exc, cfg)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return 1


def lost_peer_line(exc: BaseException, cfg) -> str | None:
    """The one line a surviving rank prints when another rank died (instead of 115-147 lines of
    tracebacks from every rank): the lost peer and the checkpoint a restart resumes from."""
    from megaspan.runtime import env_from_launcher
    from megaspan.runtime.distributed import lost_peer
    from megaspan.training.checkpoint import find_latest_valid
    from megaspan.training.trainer import checkpoint_dir

    peer = lost_peer(exc)
    if peer is None:
        return None
    try:
        latest = find_latest_valid(checkpoint_dir(cfg), warn=lambda _: None)
    except Exception:  # noqa: BLE001 - the line must come out whatever the checkpoint dir holds
        latest = None
    resume = (
        f"the last intact checkpoint is {latest}; rerun the same command to resume from it"
        if latest is not None
        else f"no intact checkpoint in {checkpoint_dir(cfg)}: a rerun starts from step 0"
    )
    return f"megaspan: rank {env_from_launcher().rank}: lost {peer}, stopping; {resume}"

"""``megaspan plan``: validate a parallel layout for N GPUs and size every GPU, without GPUs.

The work is :func:`megaspan.plan.plan` (layout, fake-process-group meta builds, memory model) and
:func:`megaspan.plan.format_plan`; this module only parses the command line.
"""

from __future__ import annotations

import argparse

from megaspan.errors import ConfigError

NAME = "plan"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megaspan plan`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        NAME,
        help="dry-run a parallel layout: validate it and size every GPU (no GPUs needed)",
        description="Validate the layout for --world-size GPUs and print per-GPU parameter counts "
        "(per pipeline stage; TP and EP ranks of a stage are equal) and a memory estimate. "
        "Settings come from the defaults, then --config, then dotted overrides.",
    )
    p.add_argument(
        "--config",
        metavar="RECIPE",
        default="default",
        help="YAML recipe: a path or a shipped name (default, tiny); default: default",
    )
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="number of GPUs")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--gpu", metavar="TYPE", help="GPU type whose memory the stages must fit (default H100)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 80GiB (overrides --gpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from megaspan.config.loader import load_config
    from megaspan.plan import format_plan, plan

    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    from megaspan.plan import fit as fitting
    from megaspan.runtime import setup_cpu

    setup_cpu()  # the meta-device builds run Megatron's CUDA sites; emulate them without a GPU
    cfg = load_config(args.config, args.overrides)
    budget, device = fitting.device_memory(args.gpu, args.gpu_memory)
    result = plan(cfg, args.world_size)
    fit = fitting.check(result, budget * fitting.HEADROOM, device)
    if not fit.fits:
        fitting.suggest(cfg, args.world_size, fit, plan)
    if args.json:
        print(json.dumps({**result.to_dict(), "fit": dataclasses.asdict(fit)}, indent=1))
    else:
        print(format_plan(result) + "\n" + fitting.format_fit(fit))
    return 0

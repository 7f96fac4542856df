"""``megaspan bench``: time placements, stock Megatron-Core and a bare loop side by side.

The work is :func:`megaspan.bench.run_bench`; this module only parses the command line.
"""

from __future__ import annotations

import argparse

NAME = "bench"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megaspan bench`` to the CLI's subparsers."""
    from megaspan.bench.presets import PRESETS
    from megaspan.bench.runner import PRECISIONS

    p = subparsers.add_parser(
        NAME,
        help="time norm placements against stock Megatron-Core (step time, tokens/s, MFU)",
        description="Build every placement plus 'stock' (Megatron-Core's own GPT layer spec) and "
        "'bare-loop' (stock driven by get_forward_backward_func + optimizer.step alone) on "
        "synthetic data, time full training steps round-robin after a warm-up, and print median "
        "step time, IQR, tokens/s and ratios to pre and stock. Presets: "
        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    p.add_argument(
        "--preset", default="cpu-small", choices=sorted(PRESETS), help="size preset (default cpu-small)"
    )
    p.add_argument(
        "--placements",
        type=_csv,
        metavar="A,B,...",
        help="placements to time (pre is always added); default: the preset's, or all",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=sorted(PRECISIONS),
        metavar="P",
        help=f"one or more of {', '.join(PRECISIONS)}; default: the preset's",
    )
    p.add_argument("--repeats", type=int, metavar="N", help="timed steps per model (default: the preset's)")
    p.add_argument(
        "--warmup", type=int, metavar="N", help="untimed steps per model first (default: the preset's)"
    )
    p.add_argument(
        "--schedule",
        default="auto",
        choices=("auto", "round-robin", "sequential"),
        help="auto: round-robin on CPU, one model after another on GPU (memory)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip stock and bare-loop")
    p.add_argument(
        "--peak-tflops", type=float, metavar="T", help="per-device peak TFLOP/s for MFU (overrides the table)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed steps, profile one more step per model (torch.profiler): op tables "
        "and traces under DIR, and each model's normalization share of op time in the table",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print B's step times relative to A's (no benchmark is run)",
    )
    p.add_argument(
        "--summary",
        nargs="+",
        metavar="FILE.json",
        help="print one table over several results, with the GPU targets (no benchmark is run)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="instead of step times, time checkpoint saves of the preset's pre model into DIR (new or "
        "empty; emptied after): how long the training loop is blocked per save, synchronous vs "
        "checkpoint.async_save, and the step time while a background write runs (--repeats rounds)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megaspan.bench import report

    if args.summary:
        print(report.summary([(path, report.load(path, "--summary")) for path in args.summary]))
        return 0
    if args.compare:
        a, b = (report.load(path, "--compare") for path in args.compare)
        print(report.compare(a, b, *args.compare))
        return 0
    if args.checkpoint:
        return _checkpoint(args)
    if args.profile:
        import os

        # Before torch loads Kineto: its logger prints a CUDA probe error on CPU-only machines.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from megaspan.bench.runner import BenchOptions, run_bench

    doc = run_bench(
        BenchOptions(
            preset=args.preset,
            placements=args.placements,
            precisions=args.precision,
            repeats=args.repeats,
            warmup=args.warmup,
            baselines=not args.no_baselines,
            schedule=args.schedule,
            peak_tflops=args.peak_tflops,
            profile_dir=args.profile,
            overrides=list(args.overrides),
        )
    )
    from megaspan.runtime.distributed import env_from_launcher

    if env_from_launcher().rank != 0:  # every rank timed; one prints
        return 0
    print(report.markdown(doc))
    if args.json:
        report.write_json(args.json, doc)
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    from megaspan.bench import report
    from megaspan.bench.checkpoint import markdown, run_checkpoint_bench
    from megaspan.bench.presets import get_preset
    from megaspan.errors import ConfigError
    from megaspan.runtime.distributed import env_from_launcher

    precisions = args.precision or [get_preset(args.preset).precision]
    if len(precisions) != 1:
        raise ConfigError("--checkpoint times one precision: pass one --precision")
    doc = run_checkpoint_bench(
        args.preset,
        precisions[0],
        args.checkpoint,
        repeats=args.repeats or 3,
        warmup=1 if args.warmup is None else args.warmup,
        overrides=list(args.overrides),
    )
    if env_from_launcher().rank != 0:
        return 0
    print(markdown(doc))
    if args.json:
        report.write_json(args.json, doc)
    return 0

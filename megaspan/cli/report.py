"""``megaspan report``: stability table, plots, config and versions of runs or sweeps.

The work is :func:`megaspan.report.build_report`; this module only parses the command line.
"""

from __future__ import annotations

import argparse

NAME = "report"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megaspan report`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        NAME,
        help="write report.md + PNG plots (loss vs LR, best-LR table, claims, stability, profiles)",
        description="Read the summary.json, TensorBoard events (or train.log) and diagnostics.jsonl of "
        "run dirs, or of every run dir under sweep dirs, and write a report: for a sweep with an "
        "LR axis, loss vs LR per depth, the best-LR loss with 95%% intervals over seeds, LR "
        "sensitivity, depth gain and the ranking at N vs N/2 steps; the claims table (a verdict "
        "per claim of the papers, computed from the runs); the stability table per placement and "
        "LR, final validation loss vs depth, loss curves per depth, per-layer profiles and "
        "mechanism metrics, and the config and versions used. Definitions: docs/evidence.md.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_SWEEP_DIR", help="run dirs or sweep dirs")
    p.add_argument(
        "-o", "--output", metavar="DIR", default=None, help="report directory (default: <first path>/report)"
    )
    p.add_argument(
        "--format",
        choices=("md", "html"),
        default="md",
        help="md: report.md next to the PNGs; html: one self-contained report.html",
    )
    p.add_argument(
        "--collapse-cosine",
        metavar="C",
        type=float,
        default=None,
        help="also count a run as collapsed when its last layer's token cosine exceeds C, e.g. 0.99 "
        "(default: the loss rule only; see docs/evidence.md)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megaspan.report import build_report

    report = build_report(args.paths, args.output, args.format, collapse_cosine=args.collapse_cosine)
    print(f"report: {report.page} ({len(report.runs)} runs, {len(report.images)} plots)")
    return 0

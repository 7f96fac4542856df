"""``megaspan eval``: score a checkpoint on lm-evaluation-harness tasks.

The work is :func:`megaspan.evaluate.harness.evaluate_tasks` with
:class:`megaspan.evaluate.harness.MegaspanLM` over :func:`megaspan.evaluate.model.load_model`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megaspan.cli.generate import add_checkpoint_args
from megaspan.errors import UserError

NAME = "eval"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        NAME,
        help="score a checkpoint on lm-evaluation-harness tasks (needs megaspan[eval])",
        description="Load a checkpoint into one process and run lm-evaluation-harness tasks on it. "
        "Standard task names need their datasets in the Hugging Face cache or the network; local "
        "task YAMLs (--include-path) work offline. Scores go to --output and, for a run dir's "
        "checkpoint, into its summary.json under 'eval'.",
    )
    add_checkpoint_args(p)
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", metavar="DIR", default=None, help="a directory of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="at most N examples per task (<1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass; default: 8")
    p.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples per prompt; default: each task's own"
    )
    p.add_argument("--output", metavar="FILE.json", default=None, help="write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name at least one lm-eval task")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    from megaspan.evaluate.harness import (
        MegaspanLM,
        _require_lm_eval,
        _task_manager,
        check_tasks,
        evaluate_tasks,
        headline,
        record_in_run_dir,
    )
    from megaspan.evaluate.model import load_model, run_dir_of

    _require_lm_eval()
    check_tasks(tasks, _task_manager(args.include_path))  # before loading the model
    model = load_model(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_tasks(
        MegaspanLM(model, args.batch_size),
        tasks,
        include_path=args.include_path,
        limit=limit,
        num_fewshot=args.num_fewshot,
    )
    results["checkpoint"] = str(model.checkpoint)
    results["step"] = model.step
    for key, value in headline(results).items():
        print(f"{key}: {value:.6g}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
        print(f"results: {args.output}")
    if (run := run_dir_of(model.checkpoint)) is not None:
        print(f"summary: {record_in_run_dir(run, model.checkpoint, model.step, results)}")
    return 0

"""``megaspan generate``: sample text from a trained checkpoint (any layout, one process).

The work is :func:`megaspan.evaluate.generate.generate` on :func:`megaspan.evaluate.model.load_model`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megaspan.errors import UserError

NAME = "generate"


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint-loading options ``generate``, ``eval`` and ``export`` share."""
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a run dir, its checkpoints/ dir (newest valid checkpoint) or one step_N checkpoint; "
        "saved under any TP/PP/EP layout",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="the tokenizer.model the checkpoint was trained with, when the recorded path is gone",
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="default: fp32")
    p.add_argument("--device", default=None, help="torch device (default: the GPU if there is one, else cpu)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        NAME,
        help="sample text from a trained checkpoint",
        description="Load a checkpoint into one process and continue each prompt. --temperature 0 "
        "is greedy decoding; the same --seed gives the same text.",
    )
    add_checkpoint_args(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", default=None, help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default: 1.0")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 (default) = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 (default) = all")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text().splitlines()
        except OSError as exc:
            raise UserError(f"--prompts {args.prompts}: cannot read it ({exc.strerror})") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    from megaspan.evaluate.generate import Sampling, generate
    from megaspan.evaluate.model import load_model

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    model = load_model(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device)
    print(
        f"# {model.checkpoint} (step {model.step}, {model.cfg.model.norm_placement}, {model.cfg.model.arch})"
    )
    for prompt, text in zip(prompts, generate(model, prompts, sampling)):
        sys.stdout.write(f"{prompt}{text}\n")
    return 0

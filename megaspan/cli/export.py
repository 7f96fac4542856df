"""``megaspan export``: a checkpoint as a Hugging Face ``transformers`` folder.

The work is :func:`megaspan.evaluate.hf.export_hf`.
"""

from __future__ import annotations

import argparse

from megaspan.cli.generate import add_checkpoint_args

NAME = "export"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        NAME,
        help="write a checkpoint as a Hugging Face transformers folder (needs megaspan[eval])",
        description="Write safetensors weights, config.json, the self-contained modeling file (every "
        "placement) and tokenizer.model: AutoModelForCausalLM.from_pretrained(DIR, "
        "trust_remote_code=True) loads it offline. Dense and MoE models.",
    )
    add_checkpoint_args(p)
    p.add_argument(
        "--format",
        choices=("hf", "llama", "mixtral"),
        default="hf",
        help="hf (default): every placement, dense or MoE, with the shipped modeling file; llama: a dense "
        "pre model as a stock LlamaForCausalLM (RMSNorm, SwiGLU, RoPE, no biases); mixtral: such a "
        "model with experts in every block (no shared expert) as a stock MixtralForCausalLM",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="a new directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megaspan.evaluate.hf import export_hf

    print(f"exported: {export_hf(args.checkpoint, args.output, args.tokenizer, args.format)}")
    return 0

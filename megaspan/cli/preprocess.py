"""``megaspan preprocess``: tokenize .txt/.jsonl files into a Megatron ``.bin``/``.idx`` dataset.

Library: :func:`megaspan.data.preprocess.preprocess_files`. The summary goes to stdout, progress
to stderr (a bar on a terminal, one line per update otherwise).
"""

from __future__ import annotations

import argparse
import os

NAME = "preprocess"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        NAME,
        help="tokenize .txt/.jsonl files into a Megatron .bin/.idx dataset",
        description="Tokenize documents (one per .txt file, one per .jsonl line), append the "
        "end-of-document id to each, and write OUTPUT_PREFIX.bin/.idx for data.paths.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".txt / .jsonl files or directories of them, in this order",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="MODEL",
        help="sentencepiece .model, Hugging Face tokenizer.json, or a local HF tokenizer directory",
    )
    p.add_argument(
        "--tokenizer-type",
        choices=("sentencepiece", "huggingface"),
        help="default: inferred (.json file or directory = huggingface)",
    )
    p.add_argument(
        "--eod-token",
        metavar="TOKEN",
        help="Hugging Face tokenizers: the token appended after each document (default: its EOS)",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (.jsonl)")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer processes (output does not depend on it); default: all cores",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megaspan.data.preprocess import preprocess_files
    from megaspan.data.tokenizer import load_tokenizer

    stats = preprocess_files(
        args.input,
        load_tokenizer(args.tokenizer, type=args.tokenizer_type, eod_token=args.eod_token),
        args.output_prefix,
        text_key=args.text_key,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(
        f"{stats.prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens "
        f"(incl. one EOD each), {stats.seconds:.1f}s"
    )
    return 0

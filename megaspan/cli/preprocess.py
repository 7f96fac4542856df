"""``megaspan preprocess``: tokenize .txt/.jsonl[.gz|.zst]/.parquet files or a Hugging Face
dataset into a Megatron ``.bin``/``.idx`` dataset.

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
        help="tokenize .txt/.jsonl/.parquet files or a HF dataset into a Megatron .bin/.idx dataset",
        description="Tokenize documents (one per .txt file, .jsonl line, parquet or dataset row), append the "
        "end-of-document id to each, and write OUTPUT_PREFIX.bin/.idx for data.paths.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help=".txt / .jsonl / .jsonl.gz / .jsonl.zst / .parquet files, directories or glob patterns "
        "of them ('shards/*.parquet'), in this order",
    )
    source.add_argument(
        "--hf-dataset",
        metavar="NAME[:CONFIG][:SPLIT]",
        help="a Hugging Face dataset (datasets.load_dataset; offline from the local cache with "
        "HF_DATASETS_OFFLINE=1) or a directory written by save_to_disk; SPLIT defaults to train",
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
    p.add_argument(
        "--text-key", default="text", help="field / column holding the text (.jsonl, .parquet, --hf-dataset)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer processes (output does not depend on it); default: all cores",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    from megaspan.data.preprocess import check_output_prefix, preprocess_files, preprocess_hf_dataset
    from megaspan.data.tokenizer import load_tokenizer

    check_output_prefix(args.output_prefix)
    tokenizer = load_tokenizer(args.tokenizer, type=args.tokenizer_type, eod_token=args.eod_token)
    options = dict(text_key=args.text_key, workers=args.workers, progress=not args.quiet)

    class Stopped(Exception):
        pass

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the hidden tmp files (tens of MB) are removed and
    # the user learns what happened (before: exit -15, no message, the tmp files left behind).
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.hf_dataset is not None:
            stats = preprocess_hf_dataset(args.hf_dataset, tokenizer, args.output_prefix, **options)
        else:
            stats = preprocess_files(args.input, tokenizer, args.output_prefix, **options)
    except Stopped as exc:
        signum = exc.args[0]
        print(
            f"megaspan preprocess: stopped by {signal.Signals(signum).name}: {args.output_prefix}.bin/.idx "
            "not written (no partial files left); run it again to preprocess",
            file=sys.stderr,
            flush=True,
        )
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(
        f"{stats.prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens "
        f"(incl. one EOD each), {stats.seconds:.1f}s"
    )
    return 0

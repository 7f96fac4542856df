"""``megaspan tokenizer train|encode|decode``: train, or run, a sentencepiece tokenizer.

Library: :mod:`megaspan.data.commands`. Results go to stdout. ``encode``/``decode`` read stdin when
no argument is given and ``decode`` writes the text with no added newline, so ``encode | decode``
round-trips a file byte for byte.
"""

from __future__ import annotations

import argparse
import sys

NAME = "tokenizer"


def register(subparsers: argparse._SubParsersAction) -> None:
    from megaspan.config.schema import TokenizerConfig  # torch-free; the defaults live there

    defaults = TokenizerConfig()
    tok = subparsers.add_parser(NAME, help="train, or run, a sentencepiece tokenizer")
    tok.set_defaults(func=run)
    actions = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="train a tokenizer (cached by corpus content and parameters)",
        description="Train a sentencepiece model on --input files, or on the embedded stdlib "
        "corpus (train split) when no --input is given. Identical inputs reuse the cached model.",
    )
    train.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help=".txt (one document per file) / .jsonl[.gz|.zst] / .parquet files, directories or "
        "glob patterns; default: the embedded stdlib corpus",
    )
    train.add_argument(
        "--text-key", default="text", help="field / column holding the text (.jsonl, .parquet)"
    )
    train.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default=defaults.model_type)
    train.add_argument(
        "--max-train-sentences",
        type=int,
        default=defaults.max_train_sentences,
        help="sample at most this many 8-line chunks (unigram is ~10x slower)",
    )
    train.add_argument(
        "--output", metavar="PATH", help="also copy the model here; default: print its cache path only"
    )
    train.add_argument("--cache-dir", help="default: $MEGASPAN_CACHE_DIR or ~/.cache/megaspan")

    encode = actions.add_parser("encode", help="text (argument or stdin) -> token ids")
    encode.add_argument(
        "--model", required=True, help="sentencepiece .model, tokenizer.json, or HF tokenizer directory"
    )
    encode.add_argument("text", nargs="?", help="text to encode; default: read stdin")

    decode = actions.add_parser("decode", help="token ids (arguments or stdin) -> text")
    decode.add_argument(
        "--model", required=True, help="sentencepiece .model, tokenizer.json, or HF tokenizer directory"
    )
    decode.add_argument("ids", nargs="*", help="token ids; default: whitespace-separated on stdin")


def _train(args: argparse.Namespace) -> int:
    from megaspan.data.commands import train_tokenizer_files

    result = train_tokenizer_files(
        args.input,
        text_key=args.text_key,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        max_train_sentences=args.max_train_sentences,
        output=args.output,
        cache_dir=args.cache_dir,
    )
    origin = "cached" if result.from_cache else "trained"
    print(f"{result.path} ({origin}, {args.model_type}, vocab {result.vocab_size})")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from megaspan.data.commands import encode_text

    text = args.text if args.text is not None else sys.stdin.read()
    print(" ".join(map(str, encode_text(args.model, text))))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from megaspan.data.commands import decode_ids

    sys.stdout.write(decode_ids(args.model, args.ids if args.ids else sys.stdin.read().split()))
    sys.stdout.flush()
    return 0


def run(args: argparse.Namespace) -> int:
    return _ACTIONS[args.tokenizer_command](args)


_ACTIONS = {"train": _train, "encode": _encode, "decode": _decode}

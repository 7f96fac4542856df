"""``megaspan tokenizer train|encode|decode`` and ``megaspan preprocess`` subcommands.

:func:`register` adds them to the ``megaspan`` CLI's subparsers. Each handler is
``func(args) -> int`` and raises :class:`~megaspan.data.DataError` for user errors; the CLI
prints that as one line and exits 2. Results go to stdout, progress to stderr.

``encode``/``decode`` read stdin when no argument is given and ``decode`` writes the text with
no added newline, so ``megaspan tokenizer encode --model M < f | megaspan tokenizer decode
--model M`` reproduces ``f`` byte for byte.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megaspan.data import DataError
from megaspan.data.tokenizer import load_tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tokenizer`` and ``preprocess`` commands to the CLI's subparsers."""
    _add_tokenizer(subparsers)
    _add_preprocess(subparsers)


def _add_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    from megaspan.config.schema import TokenizerConfig

    defaults = TokenizerConfig()
    tok = subparsers.add_parser("tokenizer", help="train, or run, a sentencepiece tokenizer")
    actions = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="train a tokenizer (cached by corpus content and parameters)",
        description="Train a sentencepiece model on --input files, or on the embedded stdlib "
        "corpus (train split) when no --input is given. Identical inputs reuse the cached model.",
    )
    train.add_argument("--input", nargs="+", metavar="FILE",
                       help=".txt (one document per file) / .jsonl files or directories; "
                       "default: the embedded stdlib corpus")
    train.add_argument("--text-key", default="text", help="JSON field holding the text (.jsonl)")
    train.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default=defaults.model_type)
    train.add_argument("--max-train-sentences", type=int, default=defaults.max_train_sentences,
                       help="sample at most this many 8-line chunks (unigram is ~10x slower)")
    train.add_argument("--output", metavar="PATH",
                       help="also copy the model here; default: print its cache path only")
    train.add_argument("--cache-dir", help="default: $MEGASPAN_CACHE_DIR or ~/.cache/megaspan")
    train.set_defaults(func=_cmd_train)

    encode = actions.add_parser("encode", help="text (argument or stdin) -> token ids")
    encode.add_argument("--model", required=True, help="sentencepiece .model file")
    encode.add_argument("text", nargs="?", help="text to encode; default: read stdin")
    encode.set_defaults(func=_cmd_encode)

    decode = actions.add_parser("decode", help="token ids (arguments or stdin) -> text")
    decode.add_argument("--model", required=True, help="sentencepiece .model file")
    decode.add_argument("ids", nargs="*", help="token ids; default: whitespace-separated on stdin")
    decode.set_defaults(func=_cmd_decode)


def _add_preprocess(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="tokenize .txt/.jsonl files into a Megatron .bin/.idx dataset",
        description="Tokenize documents (one per .txt file, one per .jsonl line), append the "
        "end-of-document id to each, and write OUTPUT_PREFIX.bin/.idx for data.paths.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt / .jsonl files or directories of them, in this order")
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="sentencepiece .model file")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (.jsonl)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (output does not depend on it); default: all cores")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=_cmd_preprocess)


def _cmd_train(args: argparse.Namespace) -> int:
    from megaspan.data.corpus import file_corpus, stdlib_corpus
    from megaspan.data.tokenizer import atomic_write_bytes, train_tokenizer

    corpus = file_corpus(args.input, args.text_key) if args.input else stdlib_corpus("train")
    tokenizer = train_tokenizer(
        corpus,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        max_train_sentences=args.max_train_sentences,
        cache_dir=args.cache_dir,
    )
    path = tokenizer.path
    if args.output:
        path = Path(args.output)
        atomic_write_bytes(path, tokenizer.path.read_bytes())
    origin = "cached" if tokenizer.from_cache else "trained"
    print(f"{path} ({origin}, {args.model_type}, vocab {tokenizer.vocab_size})")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.model)
    text = args.text if args.text is not None else sys.stdin.read()
    print(" ".join(map(str, tokenizer.tokenize(text))))
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.model)
    words = args.ids if args.ids else sys.stdin.read().split()
    try:
        ids = [int(word) for word in words]
    except ValueError:
        raise DataError("token ids must be integers separated by whitespace") from None
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise DataError(f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})")
    sys.stdout.write(tokenizer.detokenize(ids))
    sys.stdout.flush()
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from megaspan.data.preprocess import preprocess_files

    tokenizer = load_tokenizer(args.tokenizer)
    stats = preprocess_files(
        args.input, tokenizer, args.output_prefix,
        text_key=args.text_key, workers=args.workers, progress=not args.quiet,
    )
    print(f"{stats.prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens "
          f"(incl. one EOD each), {stats.seconds:.1f}s")
    return 0

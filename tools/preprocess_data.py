#!/usr/bin/env python3
"""Standalone twin of ``megaspan preprocess``: .txt/.jsonl -> Megatron .bin/.idx.

Kept for people used to Megatron-LM's ``tools/preprocess_data.py``; it takes the same options
as ``megaspan preprocess --help`` and shares its implementation.
"""

from __future__ import annotations

import argparse
import sys

from megaspan.cli.preprocess import register
from megaspan.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preprocess_data.py")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["preprocess", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except DataError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

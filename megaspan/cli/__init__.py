"""The ``megaspan`` command line: one module per command, one place that turns user errors into
one line.

Layout: every command is a module ``megaspan/cli/<name>.py`` with

* ``register(subparsers)``: adds its argparse sub-parser and ``set_defaults(func=run)``;
* ``run(args) -> int``: parses nothing further, calls ONE library function, returns the exit code.

:data:`COMMANDS` lists them in ``--help`` order. **Adding a command** (``bench``, ``sweep``,
``report``...) = write ``megaspan/cli/<name>.py`` with those two functions and add ``"<name>"``
to :data:`COMMANDS`; nothing else here changes.

Rules the command modules follow, so ``megaspan --help`` stays fast (no torch, no megatron):
import only the standard library and torch-free megaspan modules (``megaspan.config``,
``megaspan.errors``) at module level; import the library a command calls inside its ``run``.
``tests/unit/test_imports.py`` checks this in a fresh interpreter.

Errors: a :class:`megaspan.errors.UserError` (bad config, data, backend, checkpoint or run dir)
prints ONE line, ``megaspan: error: <message>``, and exits 2; it is caught here and nowhere else.
Any other exception is a bug and keeps its traceback. Known third-party console noise is filtered
once, here, by :mod:`megaspan.cli.quiet` (``--verbose`` or ``MEGASPAN_VERBOSE=1`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from megaspan.errors import EXIT_USAGE, UserError

COMMANDS: tuple[str, ...] = (
    "train",
    "plan",
    "info",
    "tokenizer",
    "preprocess",
    "bench",
    "sweep",
    "report",
    "generate",
    "eval",
    "export",
)
"""Command modules under ``megaspan.cli``, in ``--help`` order. One entry per command."""

VERBOSE_ENV = "MEGASPAN_VERBOSE"
"""``MEGASPAN_VERBOSE=1`` = ``--verbose``: show third-party warnings the CLI filters by default."""


def command_modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{name}") for name in COMMANDS]


def _add_verbose(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--verbose`` on the top parser and on every (nested) sub-parser, so both
    ``megaspan --verbose train`` and ``megaspan train --verbose`` work. Sub-parsers use
    ``SUPPRESS`` so their unset flag does not overwrite the top parser's value."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help=f"show third-party warnings that are filtered by default (also: {VERBOSE_ENV}=1)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaspan",
        description="Megatron-Core training for deep Transformers with selectable norm placements.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        module.register(subparsers)
    _add_verbose(parser, top=True)
    return parser


def verbose_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "verbose", False)) or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def error_line(exc: BaseException) -> str:
    """The one line a user error prints (``UserError`` already folds newlines; this is for safety)."""
    return f"megaspan: error: {' '.join(str(exc).split())}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megaspan.cli import quiet

    quiet.install(verbose=verbose_requested(args))
    try:
        return args.func(args)
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_USAGE


__all__ = ["COMMANDS", "build_parser", "main"]

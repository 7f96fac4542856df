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

from megaspan.errors import EXIT_USAGE, Interrupted, UserError

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


EXIT_INTERRUPTED = 130
"""128 + SIGINT: what a shell expects from a command stopped by Ctrl-C."""


def main(argv: Sequence[str] | None = None) -> int:
    """The ``megaspan`` command. ``argv=None`` means a real process (the console script or
    ``python -m megaspan``), which a command may end with :func:`exit_now`; in-process callers
    (tests) pass ``argv`` and get the exit code back."""
    args = build_parser().parse_args(argv)
    from megaspan.cli import quiet

    quiet.install(verbose=verbose_requested(args))
    args.exiting = argv is None
    try:
        code = args.func(args)
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt as exc:
        # A second Ctrl-C (the signal handler has said what it means) or one before the handler
        # was installed: no traceback, the shell's exit code.
        if not isinstance(exc, Interrupted):
            print("megaspan: interrupted", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    if args.exiting and getattr(args, "fast_exit", False):
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """Exit without the interpreter's finalization: after a training run, tearing down torch's
    and Megatron's modules object by object took 2-18 s after the last line (counted against
    Slurm's KillWait, and a window for a SIGTERM to turn exit 0 into -15). Everything a run
    writes is closed by then; the non-daemon threads are joined and the atexit handlers run
    (logging, multiprocessing's resource tracker) as a normal exit would."""
    import atexit
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the exit code is decided; these are milliseconds
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


__all__ = ["COMMANDS", "build_parser", "main"]

"""The one root of user-facing errors.

A :class:`UserError` means *the input is wrong*, not that megaspan has a bug: its message is one
complete line naming what is wrong and how to fix it. ``megaspan``'s command line catches
``UserError`` once, prints ``megaspan: error: <message>`` and exits 2 with no traceback. Every
other exception is a bug and keeps its traceback.

Subclasses say which layer found the problem; callers that only want "the user's fault" catch
``UserError``. This module imports nothing (layer 0): every package may raise these.
"""

from __future__ import annotations

EXIT_USAGE = 2
"""Exit code of a run refused because of bad input (argparse uses the same)."""


class UserError(ValueError):
    """Bad input: a one-line message with the fix. Newlines are folded so it stays one line."""

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A config key, value or combination that cannot run (unknown key, TP not dividing heads...)."""


class DataError(UserError):
    """A data problem: missing file, empty corpus, bad blend, tokenizer/vocab mismatch."""


class BackendError(UserError):
    """A backend the config asks for is not available here (Transformer Engine, CUDA, FP8)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, from another model or tokenizer."""


class RunDirError(UserError):
    """The run directory (or another output path) cannot be used: not writable, full, locked."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C whose meaning has already been printed (the second one during a run): the
    command line exits 130 without another line."""


__all__ = [
    "EXIT_USAGE",
    "BackendError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Interrupted",
    "RunDirError",
    "UserError",
]

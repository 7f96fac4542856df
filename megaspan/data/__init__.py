"""Data pipeline: embedded corpus, sentencepiece tokenizer, preprocessing, Megatron datasets.

The submodules are imported explicitly (``from megaspan.data.tokenizer import ...``) rather than
re-exported here, because :mod:`megaspan.data.datasets` and :mod:`megaspan.data.preprocess`
pull in ``megatron.core`` (several seconds of import time). Keeping this package light lets the
tokenizer CLI and preprocessing worker processes start instantly.
"""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem (missing file, empty corpus, bad blend).

    The message is always a single line that names the offending path or value and the fix, so
    the CLI can print it verbatim and exit 2 without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", " ").replace("\n", " "))


__all__ = ["DataError"]

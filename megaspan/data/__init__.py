"""Data pipeline: embedded corpus, sentencepiece tokenizer, preprocessing, Megatron datasets.

The submodules are imported explicitly (``from megaspan.data.tokenizer import ...``) rather than
re-exported here, because :mod:`megaspan.data.datasets` and :mod:`megaspan.data.preprocess`
pull in ``megatron.core`` (several seconds of import time). Keeping this package light lets the
tokenizer CLI and preprocessing worker processes start instantly.
"""

from __future__ import annotations

from megaspan.errors import DataError

__all__ = ["DataError"]

"""The library behind ``megaspan tokenizer train|encode|decode`` and ``megaspan preprocess``.

The argparse side lives in :mod:`megaspan.cli.tokenizer` and :mod:`megaspan.cli.preprocess`;
these functions take plain values, return results, and raise :class:`~megaspan.data.DataError`
for user errors (the CLI prints that as one line and exits 2).

``encode_text``/``decode_ids`` are exact inverses on text the tokenizer covers, so
``megaspan tokenizer encode --model M < f | megaspan tokenizer decode --model M`` reproduces ``f``
byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megaspan.data import DataError
from megaspan.data.tokenizer import load_tokenizer


@dataclass(frozen=True)
class TrainedTokenizer:
    path: Path
    """Where the model is: ``output`` if given, else its cache path."""
    from_cache: bool
    vocab_size: int


def train_tokenizer_files(
    inputs: Sequence[str | os.PathLike[str]] | None,
    *,
    text_key: str = "text",
    vocab_size: int,
    model_type: str,
    max_train_sentences: int,
    output: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TrainedTokenizer:
    """Train (or reuse from the cache) a sentencepiece model on ``inputs``, or on the embedded
    stdlib corpus's train split when ``inputs`` is empty; copy it to ``output`` when given."""
    from megaspan.data.corpus import file_corpus, stdlib_corpus
    from megaspan.data.tokenizer import atomic_write_bytes, train_tokenizer

    corpus = file_corpus(inputs, text_key) if inputs else stdlib_corpus("train")
    tokenizer = train_tokenizer(
        corpus,
        vocab_size=vocab_size,
        model_type=model_type,
        max_train_sentences=max_train_sentences,
        cache_dir=cache_dir,
    )
    path = tokenizer.path
    if output:
        path = Path(output)
        atomic_write_bytes(path, tokenizer.path.read_bytes())
    return TrainedTokenizer(path, tokenizer.from_cache, tokenizer.vocab_size)


def encode_text(model: str | os.PathLike[str], text: str) -> list[int]:
    return list(load_tokenizer(model).tokenize(text))


def decode_ids(model: str | os.PathLike[str], words: Sequence[str]) -> str:
    """Token ids given as strings (command-line words) -> text; bad ids are a :class:`DataError`."""
    tokenizer = load_tokenizer(model)
    try:
        ids = [int(word) for word in words]
    except ValueError:
        raise DataError("token ids must be integers separated by whitespace") from None
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise DataError(f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})")
    return tokenizer.detokenize(ids)

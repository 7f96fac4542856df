"""Tokenize documents into Megatron ``.bin``/``.idx`` indexed datasets.

Uses Megatron's own :class:`IndexedDatasetBuilder`, so the output is exactly what
``GPTDataset`` and upstream Megatron tools read. Each document is stored as one sequence of its
token ids followed by the tokenizer's ``eod`` id; the EOD both separates documents once
GPTDataset packs them into fixed-length samples and guarantees no sequence has length 0 (a
zero-length sequence makes ``GPTDataset._get_num_epochs`` loop forever).

Parallelism: tokenization runs in a ``spawn`` process pool with ordered ``imap``, so the output
is byte-identical for any worker count. ``spawn`` rather than ``fork`` because the caller (a
trainer with torch, gloo/NCCL and dataloader threads) is multi-threaded, and a forked child of a
threaded process can deadlock on a lock another thread held (seen in practice). The price is the
usual spawn rule: a *script* that calls this at import time needs an
``if __name__ == "__main__":`` guard (multiprocessing raises a clear error otherwise); the
``megaspan`` CLI has one. Workers import only this module and sentencepiece, not megatron.

Writes are atomic: the builder writes a hidden temp prefix that is renamed into place, ``.bin``
first and ``.idx`` last, and :func:`is_complete` checks that the two agree, so an interrupted
run never leaves a prefix that looks valid.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy

from megaspan.data import DataError
from megaspan.data.corpus import (
    count_rows,
    expand_inputs,
    hf_dataset_documents,
    iter_documents,
    stdlib_corpus,
    stdlib_documents,
    stdlib_files,
)
from megaspan.data.tokenizer import default_cache_dir

if TYPE_CHECKING:
    from megaspan.data.tokenizer import Tokenizer

_CHUNKSIZE = 8
"""Documents per pool task: big enough to amortize IPC, small enough to balance long files."""
_PROGRESS_EVERY_S = 0.5
"""Seconds between redraws of the progress line on a terminal."""
_LOG_EVERY_S = 10.0
"""Seconds between progress lines when stderr is not a terminal (a log file)."""
_BAR_WIDTH = 20


@dataclass(frozen=True)
class PreprocessStats:
    """What a preprocessing run wrote."""

    prefix: str
    documents: int
    tokens: int
    """Including one EOD per document."""
    seconds: float


def preprocess_documents(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_prefix: str | os.PathLike[str],
    *,
    workers: int = 1,
    progress: bool = True,
    expected_documents: int | None = None,
) -> PreprocessStats:
    """Tokenize ``documents`` (+ EOD each) into ``output_prefix.bin`` / ``output_prefix.idx``.

    ``workers <= 1`` tokenizes in this process. Empty strings are skipped. Raises
    :class:`DataError` if no document was written. ``expected_documents`` (default: ``len`` of
    ``documents`` when it has one) only sizes the progress bar.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.parent / f".{prefix.name}.{secrets.token_hex(6)}.tmp"  # unique across hosts
    total = expected_documents
    if total is None and isinstance(documents, Sized):
        total = len(documents)
    meter = _Progress(prefix.name, enabled=progress, total=total)
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    try:
        for ids in _encode_all(documents, tokenizer, workers):
            builder.add_document(ids, [len(ids)])
            meter.update(len(ids))
        builder.finalize(f"{tmp}.idx")
        if meter.documents == 0:
            raise DataError(f"no documents to write to {prefix}: the input is empty")
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    finally:
        meter.close()
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return PreprocessStats(str(prefix), meter.documents, meter.tokens, meter.elapsed())


def check_output_prefix(output_prefix: str | os.PathLike[str]) -> None:
    """A prefix names files (PREFIX.bin, PREFIX.idx), not a directory: ``out/`` wrote ``out.bin``
    beside the directory."""
    raw = os.fspath(output_prefix)
    if raw.endswith(("/", os.sep)) or Path(raw).is_dir():
        name = raw.rstrip("/" + os.sep) or raw
        raise DataError(
            f"--output-prefix {raw} is a directory; give a file prefix inside it, e.g. "
            f"{name}/data (writes {name}/data.bin and {name}/data.idx)"
        )


def preprocess_files(
    inputs: Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    output_prefix: str | os.PathLike[str],
    *,
    text_key: str = "text",
    workers: int = 1,
    progress: bool = True,
) -> PreprocessStats:
    """Preprocess ``.txt`` (one document per file), ``.jsonl[.gz|.zst]`` and ``.parquet`` files
    (and globs of them), in the given order.

    Input paths (and parquet text columns) are checked before anything is written (or megatron
    is imported).
    """
    check_output_prefix(output_prefix)
    files = expand_inputs(inputs, text_key)
    return preprocess_documents(
        iter_documents(files, text_key),
        tokenizer,
        output_prefix,
        workers=workers,
        progress=progress,
        expected_documents=count_rows(files),
    )


def preprocess_hf_dataset(
    spec: str,
    tokenizer: Tokenizer,
    output_prefix: str | os.PathLike[str],
    *,
    text_key: str = "text",
    workers: int = 1,
    progress: bool = True,
) -> PreprocessStats:
    """Preprocess a Hugging Face dataset ``NAME[:CONFIG][:SPLIT]`` (see
    :func:`megaspan.data.corpus.hf_dataset_documents`); it is opened before anything is written."""
    check_output_prefix(output_prefix)
    documents, rows = hf_dataset_documents(spec, text_key)
    return preprocess_documents(
        documents, tokenizer, output_prefix, workers=workers, progress=progress, expected_documents=rows
    )


def preprocess_stdlib(
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """The embedded corpus as indexed datasets: ``{"train": prefix, "valid": prefix}``.

    Prefixes live in ``<cache_dir>/stdlib/<key>/{train,valid}``, ``key`` hashing the corpus
    content and the tokenizer model, and are only built when absent or incomplete. Not
    rank-aware by itself: in multi-rank runs call it through
    :func:`megaspan.data.tokenizer.rank_zero_first` (``build_datasets`` does).
    """
    digest = hashlib.sha256(tokenizer.sha256.encode())
    for split in ("train", "valid"):
        for text in stdlib_documents(split):
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
    root = default_cache_dir(cache_dir) / "stdlib" / digest.hexdigest()[:16]
    prefixes: dict[str, str] = {}
    for split in ("train", "valid"):
        prefix = root / split
        if not is_complete(prefix):
            preprocess_documents(
                stdlib_corpus(split),
                tokenizer,
                prefix,
                workers=workers if workers is not None else min(4, os.cpu_count() or 1),
                progress=progress,
                expected_documents=len(stdlib_files(split)),
            )
        prefixes[split] = str(prefix)
    return prefixes


def index_stats(prefix: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(sequences, tokens, bytes per token)`` recorded in ``prefix.idx``.

    Values are copied out before the reader is dropped: Megatron's ``_IndexReader`` closes its
    mmap in ``__del__``, so touching an array of a dead reader segfaults.
    """
    from megatron.core.datasets.indexed_dataset import _IndexReader

    index = _IndexReader(f"{prefix}.idx", multimodal=False)
    stats = (len(index), int(index.sequence_lengths.sum()), numpy.dtype(index.dtype).itemsize)
    del index
    return stats


def is_complete(prefix: str | os.PathLike[str]) -> bool:
    """Whether ``prefix.bin`` and ``prefix.idx`` both exist and describe the same, non-empty data.

    Compares the ``.bin`` size with the token count and dtype recorded in the ``.idx``, which
    catches a missing file, a truncated write, and a ``.bin`` from a different run.
    """
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    if not (bin_path.is_file() and idx_path.is_file()):
        return False
    try:
        sequences, tokens, itemsize = index_stats(prefix)
    except (AssertionError, ValueError, OSError):
        return False
    return sequences > 0 and bin_path.stat().st_size == tokens * itemsize


def _encode_all(documents: Iterable[str], tokenizer: Tokenizer, workers: int) -> Iterator[numpy.ndarray]:
    texts = (text for text in documents if text)
    if workers <= 1:
        yield from (_encode_with(tokenizer, text) for text in texts)
        return
    context = multiprocessing.get_context("spawn")
    # The tokenizer pickles as its files (+ special-token choice) and is rebuilt in each worker.
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode, texts, chunksize=_CHUNKSIZE)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode(text: str) -> numpy.ndarray:
    assert _worker_tokenizer is not None, "_init_worker did not run in this process"
    return _encode_with(_worker_tokenizer, text)


def _encode_with(tokenizer: Tokenizer, text: str) -> numpy.ndarray:
    ids = tokenizer.tokenize(text)
    ids.append(tokenizer.eod)
    return numpy.asarray(ids, dtype=numpy.int32)


class _Progress:
    """Progress of one preprocess run on stderr: documents, tokens, documents/s, tokens/s.

    On a terminal it is one line redrawn in place (with a bar when the number of documents is
    known up front); captured to a log (not a TTY) it is one complete line per update, every
    :data:`_LOG_EVERY_S` seconds, plus a final line, so a log file never holds a run-on line of
    carriage returns.
    """

    def __init__(
        self, name: str, *, enabled: bool, total: int | None = None, stream: TextIO | None = None
    ) -> None:
        self.name = name
        self.enabled = enabled
        self.total = total
        self.documents = 0
        self.tokens = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = _isatty(self._stream)
        self._every = _PROGRESS_EVERY_S if self._tty else _LOG_EVERY_S
        self._start = time.monotonic()
        self._last = self._start

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def update(self, tokens: int) -> None:
        self.documents += 1
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self._last >= self._every:
            self._last = now
            self._write()

    def close(self) -> None:
        """Print the final totals and end the line, so later messages start on their own line."""
        if self.enabled:
            self._write(final=True)

    def _write(self, *, final: bool = False) -> None:
        seconds = max(self.elapsed(), 1e-9)
        text = (
            f"preprocess {self.name}: {self.documents} docs, {self.tokens} tokens, "
            f"{self.documents / seconds:.0f} docs/s, {self.tokens / seconds:.0f} tokens/s"
        )
        if self._tty:
            bar = ""
            if self.total:
                # The total may be an upper bound (empty documents are skipped): full when done.
                done = 1.0 if final else min(self.documents / self.total, 1.0)
                filled = int(round(done * _BAR_WIDTH))
                bar = f" {done:4.0%} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"
            # \r returns to the line start, \x1b[K clears what a longer earlier line left behind.
            self._stream.write(f"\r{text}{bar}\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(f"{text}{' (done)' if final else ''}\n")
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False

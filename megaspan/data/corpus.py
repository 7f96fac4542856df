"""Document sources: the embedded Python-stdlib corpus and user ``.txt`` / ``.jsonl`` files.

The embedded corpus exists so that ``megaspan train`` works out of the box, offline, with real
(non-random) text whose loss curve means something. It is the ``*.py`` source of the standard
library of the *running* interpreter, so it needs no download and no packaged data file.

Decisions, and why:

* **Test directories are excluded** (any path component named ``test``, ``tests`` or
  ``idle_test``). The stdlib test suites are ~2/3 of the bytes, are full of deliberately
  malformed input and huge generated literals, and would slow tokenizer training and
  preprocessing without making the corpus more representative of code. ``site-packages`` and
  ``dist-packages`` are excluded because they are not the stdlib.
* **Order is deterministic**: files are sorted by their POSIX path relative to the stdlib root,
  so two machines with the same interpreter produce the same documents in the same order.
* **Files that are not valid UTF-8 are skipped** (a handful of legacy-encoded modules); decoding
  them with replacement characters would teach the tokenizer garbage.
* **Validation is held out by file**, not by token range: a file's split depends only on a hash
  of its relative path (~2 % go to ``valid``). Splitting inside files would leak near-duplicate
  code (imports, license headers, the rest of the same function) across the split.

User files: a ``.txt`` file is **one document** (the whole file). Splitting on blank lines
would cut source code and prose paragraphs of the same text into unrelated documents; users
who want finer documents should write ``.jsonl``. A ``.jsonl`` file holds one JSON object per
line with the text under a configurable key (default ``"text"``); blank lines are ignored.
``.jsonl.gz`` and ``.jsonl.zst`` are the same, compressed (``.zst`` needs the ``zstandard``
package). A ``.parquet`` file (FineWeb, DCLM, The Stack) holds one document per row, the text in
the ``text_key`` column; it is read one record batch of that column at a time (pyarrow, within
row groups), never a whole shard, and null/empty texts are skipped. Inputs may be glob patterns
(``data/*.parquet``, sorted). A Hugging Face dataset (``--hf-dataset``) is read by
:func:`hf_dataset_documents`.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from megaspan.data import DataError

Split = Literal["train", "valid"]

VALID_PER_MILLE = 20
"""Files whose path hash falls below this (out of 1000) form the held-out validation split."""

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_INPUT_KINDS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".parquet": "parquet",
}
"""Input file name endings and how each is read."""
_PARQUET_BATCH_ROWS = 1024
"""Rows per pyarrow record batch: bounded memory however large the shard's row groups are."""


@dataclass(frozen=True)
class Corpus:
    """A named, re-iterable source of documents.

    Tokenizer training iterates its input twice (once to hash it for the cache key, once to
    train), so corpora are factories rather than one-shot iterators.
    """

    name: str
    open_documents: Callable[[], Iterator[str]]

    def __iter__(self) -> Iterator[str]:
        return self.open_documents()


def stdlib_root() -> Path:
    """The directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_valid_file(relative_path: str) -> bool:
    """Whether a stdlib file (POSIX path relative to the stdlib root) is held out for validation.

    A content-independent hash of the path keeps the assignment stable when a file is edited
    between interpreter patch releases.
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 1000 < VALID_PER_MILLE


def stdlib_files(split: Split) -> list[Path]:
    """The stdlib ``*.py`` files of ``split``, sorted by relative POSIX path."""
    _check_split(split)
    valid = split == "valid"
    return [Path(path) for _, path, held_out in _stdlib_index(str(stdlib_root())) if held_out == valid]


@functools.cache
def _stdlib_index(root: str) -> tuple[tuple[str, str, bool], ...]:
    """Every corpus file under ``root`` as ``(relative POSIX path, path, held out for validation)``,
    sorted by relative path. Walked once per process: the interpreter's own stdlib does not
    change under it, and a run lists it several times (the tokenizer's cache key, the datasets'
    cache key, the documents themselves). Plain strings, not ``pathlib``: 10x faster."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]  # prune: never descend
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".py") and os.path.isfile(path):
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                files.append((rel, path, is_valid_file(rel)))
    return tuple(sorted(files))


def stdlib_documents(split: Split) -> Iterator[str]:
    """Yield the text of each stdlib file of ``split`` (exact bytes decoded as UTF-8).

    Empty files (many ``__init__.py``) and non-UTF-8 files are skipped.
    """
    for path in stdlib_files(split):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            yield text


def stdlib_corpus(split: Split) -> Corpus:
    """The embedded corpus as a re-iterable :class:`Corpus`."""
    _check_split(split)
    return Corpus(name=f"stdlib-{split}", open_documents=lambda: stdlib_documents(split))


def read_txt(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield the whole of a UTF-8 ``.txt`` file as one document (nothing if it is empty)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, data[: err.start].count(b"\n") + 1, err) from None
    if text:
        yield text


def _utf8_error(path: str | os.PathLike[str], lineno: int, err: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path}:{lineno}: not valid UTF-8 (byte 0x{err.object[err.start]:02x}); re-encode the file as "
        "UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove that line"
    )


def read_jsonl(path: str | os.PathLike[str], text_key: str = "text") -> Iterator[str]:
    """Yield ``obj[text_key]`` for each JSON object line of a ``.jsonl`` file.

    Blank lines are skipped; empty texts are skipped. A malformed line is an error rather than
    being skipped, because silently losing data shifts every later document.
    """
    with _open_binary(Path(path)) as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, lineno, err) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(
                    f"{path}:{lineno}: expected an object with a string field {text_key!r};"
                    f" pass --text-key to name the field that holds the text"
                )
            if record[text_key]:
                yield record[text_key]


def input_kind(path: str | os.PathLike[str]) -> str | None:
    """``"txt"``, ``"jsonl"`` (also ``.jsonl.gz``/``.jsonl.zst``) or ``"parquet"``; None if unsupported."""
    name = Path(path).name
    return next((kind for end, kind in _INPUT_KINDS.items() if name.endswith(end)), None)


def expand_inputs(paths: Sequence[str | os.PathLike[str]], text_key: str | None = None) -> list[Path]:
    """Resolve input paths to files: directories expand to their supported files, glob patterns
    to their matches (both sorted).

    Raises :class:`DataError` for a missing path, a pattern matching nothing, an unsupported file
    type, or a ``.jsonl.zst`` without ``zstandard``, before any work is done; with ``text_key``
    also for a ``.parquet`` file without that column (read from its footer only).
    """
    supported = ", ".join(_INPUT_KINDS)
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and input_kind(p))
            if not found:
                raise DataError(f"{path}: directory holds no input files ({supported})")
            files.extend(found)
        elif path.is_file():
            if input_kind(path) is None:
                raise DataError(f"{path}: unsupported input type; use {supported} files")
            files.append(path)
        elif glob.has_magic(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{raw}: the pattern matches no files")
            unsupported = [m for m in matches if input_kind(m) is None]
            if unsupported:
                raise DataError(f"{unsupported[0]}: unsupported input type; use {supported} files")
            files.extend(matches)
        else:
            raise DataError(f"{path}: input file not found")
    if any(f.name.endswith(".zst") for f in files):
        _zstandard(files[0])
    if text_key is not None:
        for file in files:
            if input_kind(file) == "parquet":
                _parquet_file(file, text_key)
    return files


def iter_documents(paths: Sequence[str | os.PathLike[str]], text_key: str = "text") -> Iterator[str]:
    """Yield the documents of input files (and directories of them), in order."""
    for path in expand_inputs(paths):
        kind = input_kind(path)
        if kind == "jsonl":
            yield from read_jsonl(path, text_key)
        elif kind == "parquet":
            yield from read_parquet(path, text_key)
        else:
            yield from read_txt(path)


def read_parquet(path: str | os.PathLike[str], text_key: str = "text") -> Iterator[str]:
    """Yield the ``text_key`` column of a ``.parquet`` file row by row, one record batch of that
    column in memory at a time; null and empty texts are skipped (as empty ``.jsonl`` texts are)."""
    parquet = _parquet_file(Path(path), text_key)
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def count_rows(files: Sequence[Path]) -> int | None:
    """Documents the inputs hold at most, when that is known without reading them (all parquet:
    their footers' row counts); sizes the progress bar."""
    if not files or any(input_kind(f) != "parquet" for f in files):
        return None
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _parquet_file(path: Path, text_key: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'megaspan[data]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    schema = parquet.schema_arrow
    if text_key not in schema.names:
        raise DataError(
            f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); pass --text-key "
            f"to name the column that holds the text"
        )
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {text_key!r} holds {kind}, not text; pass --text-key")
    return parquet


def _zstandard(path: Path):
    try:
        import zstandard
    except ImportError:
        raise DataError(
            f"{path}: reading .jsonl.zst needs the zstandard package (pip install zstandard), "
            f"or decompress it first (zstd -d)"
        ) from None
    return zstandard


def _open_binary(path: Path) -> IO[bytes]:
    """The decompressed bytes of a ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` file, read line by
    line (decoded per line by the caller, so invalid UTF-8 is reported with its line number)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        raw = _zstandard(path).ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(raw)
    return open(path, "rb")


def hf_dataset_documents(spec: str, text_key: str = "text") -> tuple[Iterator[str], int]:
    """``(documents, row count)`` of a Hugging Face dataset named ``NAME[:CONFIG][:SPLIT]``.

    ``NAME`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or
    a dataset name ``datasets.load_dataset`` resolves (the Hub, or only the local cache when
    ``HF_DATASETS_OFFLINE=1``). ``SPLIT`` defaults to ``train``. The dataset is opened (and the
    column checked) now; its Arrow files are memory-mapped and read in batches, not loaded.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("--hf-dataset needs the datasets package: pip install 'megaspan[data]'") from None
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise DataError(f"--hf-dataset {spec!r}: expected NAME[:CONFIG][:SPLIT]")
    name, config, split = (parts + ["", ""])[:3]
    split = split or "train"
    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(
                        f"--hf-dataset {spec!r}: no split {split!r} (splits: {', '.join(loaded)})"
                    )
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name, config or None, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        offline = os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0") or os.environ.get(
            "HF_HUB_OFFLINE", ""
        ) not in ("", "0")
        hint = (
            "it is not in the local cache (HF_DATASETS_OFFLINE=1): load it once online, or save it "
            "with Dataset.save_to_disk and pass that directory"
            if offline
            else "check the name, config and split, or pass a directory written by save_to_disk"
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"--hf-dataset {spec!r} could not be loaded ({first[:200]}); {hint}") from None
    if text_key not in loaded.column_names:
        raise DataError(
            f"--hf-dataset {spec!r}: no column {text_key!r} (columns: {', '.join(loaded.column_names)}); "
            f"pass --text-key to name the column that holds the text"
        )

    def documents() -> Iterator[str]:
        for batch in loaded.select_columns([text_key]).iter(batch_size=_PARQUET_BATCH_ROWS):
            for text in batch[text_key]:
                if text:
                    yield text

    return documents(), loaded.num_rows


def file_corpus(paths: Sequence[str | os.PathLike[str]], text_key: str = "text") -> Corpus:
    """User files as a re-iterable :class:`Corpus`; paths are validated immediately."""
    files = expand_inputs(paths, text_key)
    return Corpus(
        name=",".join(str(p) for p in files),
        open_documents=lambda: iter_documents(files, text_key),
    )


def write_jsonl(documents: Iterable[str], path: str | os.PathLike[str], text_key: str = "text") -> int:
    """Write documents as ``.jsonl`` atomically (temp file, then rename); return the count.

    This is how to export the embedded corpus for other tools:
    ``write_jsonl(stdlib_documents("train"), "stdlib-train.jsonl")``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for text in documents:
                handle.write(json.dumps({text_key: text}, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _check_split(split: str) -> None:
    if split not in ("train", "valid"):
        raise DataError(f"unknown corpus split {split!r}; use 'train' or 'valid'")

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
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megaspan.data import DataError

Split = Literal["train", "valid"]

VALID_PER_MILLE = 20
"""Files whose path hash falls below this (out of 1000) form the held-out validation split."""

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_SUPPORTED_SUFFIXES = (".txt", ".jsonl")


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
    root = stdlib_root()
    selected: list[tuple[str, Path]] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]  # prune: never descend
        for name in names:
            path = Path(directory, name)
            if name.endswith(".py") and path.is_file():
                rel = path.relative_to(root).as_posix()
                if is_valid_file(rel) == (split == "valid"):
                    selected.append((rel, path))
    return [path for _, path in sorted(selected)]


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
    with open(path, "rb") as handle:
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


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Resolve input paths to files: directories expand to their ``.txt``/``.jsonl`` files, sorted.

    Raises :class:`DataError` for a missing path or an unsupported suffix, before any work is done.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUPPORTED_SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in _SUPPORTED_SUFFIXES:
                raise DataError(f"{path}: unsupported input type; use .txt or .jsonl files")
            files.append(path)
        else:
            raise DataError(f"{path}: input file not found")
    return files


def iter_documents(paths: Sequence[str | os.PathLike[str]], text_key: str = "text") -> Iterator[str]:
    """Yield the documents of ``.txt``/``.jsonl`` files (and directories of them), in order."""
    for path in expand_inputs(paths):
        if path.suffix == ".jsonl":
            yield from read_jsonl(path, text_key)
        else:
            yield from read_txt(path)


def file_corpus(paths: Sequence[str | os.PathLike[str]], text_key: str = "text") -> Corpus:
    """User files as a re-iterable :class:`Corpus`; paths are validated immediately."""
    files = expand_inputs(paths)
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

"""The embedded stdlib corpus and the user-file readers."""

from __future__ import annotations

import json

import pytest

from megaspan.data import DataError
from megaspan.data.corpus import (
    file_corpus,
    iter_documents,
    stdlib_documents,
    stdlib_files,
    stdlib_root,
    write_jsonl,
)


def _relative(split: str) -> list[str]:
    root = stdlib_root()
    return [p.relative_to(root).as_posix() for p in stdlib_files(split)]


def test_stdlib_splits_are_deterministic_nonempty_and_disjoint_by_file():
    train, valid = _relative("train"), _relative("valid")
    assert train == _relative("train") and valid == _relative("valid")
    assert train == sorted(train) and valid == sorted(valid)
    assert len(valid) > 0 and len(train) > 20 * len(valid)  # ~2 % held out
    assert not set(train) & set(valid)
    assert not any(
        part in ("test", "tests", "site-packages") for rel in train + valid for part in rel.split("/")[:-1]
    )
    docs = list(stdlib_documents("valid"))
    assert docs and all(isinstance(d, str) and d for d in docs)
    assert docs == list(stdlib_documents("valid"))


def test_bad_split_name():
    with pytest.raises(DataError):
        stdlib_files("test")


def test_txt_is_one_document_and_jsonl_uses_text_key(tmp_path):
    (tmp_path / "a.txt").write_text("para one\n\npara two\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "x\ty"}) + "\n\n" + json.dumps({"body": "é"}) + "\n", encoding="utf-8"
    )
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"], text_key="body"))
    assert docs == ["para one\n\npara two\n", "x\ty", "é"]
    assert list(file_corpus([tmp_path], text_key="body")) == docs  # directory, sorted
    out = tmp_path / "out" / "c.jsonl"
    assert write_jsonl(docs, out) == 3
    assert list(iter_documents([out])) == docs


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("missing.txt", None, "not found"),
        ("bad.jsonl", '{"text": 1}\n', "bad.jsonl:1"),
        ("bad2.jsonl", "{nope\n", "invalid JSON"),
        ("data.csv", "a,b\n", "unsupported"),
    ],
)
def test_reader_errors_are_one_line(tmp_path, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(iter_documents([path]))
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("bad.txt", b"fine\nalso fine\nbad \xff\xfe here\nmore\n", 3),
        ("bad.jsonl", b'{"text": "ok"}\n\n{"text": "bad \xff"}\n', 3),
        ("bad.jsonl.gz", b'{"text": "ok"}\n\n{"text": "bad \xff"}\n', 3),  # compressed: the same line
    ],
)
def test_invalid_utf8_names_the_file_and_line(tmp_path, name, content, line):
    """issue 20 item 9: a bare UnicodeDecodeError (jsonl) or a byte offset (txt) before."""
    import gzip

    from megaspan.data.corpus import iter_documents
    from megaspan.errors import DataError

    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DataError, match=rf"{name}:{line}: not valid UTF-8 \(byte 0xff\); re-encode"):
        list(iter_documents([path]))

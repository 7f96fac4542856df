"""Documents -> .bin/.idx -> documents, exactly, for any worker count."""

from __future__ import annotations

import json

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaspan.data import DataError
from megaspan.data.corpus import stdlib_corpus, stdlib_documents
from megaspan.data.preprocess import is_complete, preprocess_documents, preprocess_files
from megaspan.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(
        stdlib_corpus("train"),
        vocab_size=512,
        max_train_sentences=2000,
        cache_dir=tmp_path_factory.mktemp("cache"),
    )


def _decoded(prefix, tokenizer) -> list[str]:
    dataset = IndexedDataset(str(prefix))
    docs = []
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]  # one EOD, at the end
        docs.append(tokenizer.detokenize(ids[:-1]))
    return docs


def test_stdlib_roundtrip_identical_for_1_and_2_workers(tmp_path, tokenizer):
    docs = list(stdlib_documents("valid"))
    one = preprocess_documents(docs, tokenizer, tmp_path / "w1", workers=1, progress=False)
    two = preprocess_documents(docs, tokenizer, tmp_path / "w2", workers=2, progress=True)
    assert (
        (one.documents, one.tokens)
        == (two.documents, two.tokens)
        == (len(docs), sum(len(tokenizer.tokenize(d)) + 1 for d in docs))
    )
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    assert _decoded(tmp_path / "w2", tokenizer) == docs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w1.bin", "w1.idx", "w2.bin", "w2.idx"]


def test_files_roundtrip_and_progress_on_stderr(tmp_path, tokenizer, capsys):
    (tmp_path / "a.txt").write_text("first\n\n  second paragraph\t\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"content": t}) + "\n" for t in ["é 日本", "", "x = 1\r\n"]),
        encoding="utf-8",
    )
    stats = preprocess_files(
        [tmp_path / "a.txt", tmp_path / "b.jsonl"],
        tokenizer,
        tmp_path / "out" / "mix",
        text_key="content",
        workers=2,
    )
    assert stats.documents == 3  # the empty jsonl text is skipped
    assert _decoded(tmp_path / "out" / "mix", tokenizer) == [
        "first\n\n  second paragraph\t\n",
        "é 日本",
        "x = 1\r\n",
    ]
    assert "3 docs" in capsys.readouterr().err


def test_failure_leaves_no_output_and_truncation_is_detected(tmp_path, tokenizer):
    with pytest.raises(DataError) as info:
        preprocess_documents([], tokenizer, tmp_path / "empty", progress=False)
    assert "empty" in str(info.value) and "\n" not in str(info.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        preprocess_files([bad], tokenizer, tmp_path / "bad", workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no partial/temp files

    preprocess_documents(["some text"] * 3, tokenizer, tmp_path / "ok", progress=False)
    assert is_complete(tmp_path / "ok")
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "ok.bin").write_bytes(data[:-2])
    assert not is_complete(tmp_path / "ok")

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


@pytest.mark.parametrize("trailing", ["/", ""])
def test_output_prefix_that_is_a_directory_is_refused(tmp_path, tokenizer, trailing):
    """issue 20 item 10: `--output-prefix DIR/` wrote DIR.bin beside the directory."""
    (tmp_path / "in.txt").write_text("hello\n")
    out = tmp_path / "out"
    if not trailing:
        out.mkdir()
    with pytest.raises(DataError, match=r"is a directory; give a file prefix inside it"):
        preprocess_files([tmp_path / "in.txt"], tokenizer, f"{out}{trailing}")
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


@pytest.mark.integration  # CLI subprocesses (~20 s)
def test_sigterm_removes_the_tmp_files_and_says_so(tmp_path, tokenizer):
    """issue 20 item 10: SIGTERM left hidden tmp files of 80-90 MB and exited -15 silently."""
    import os
    import signal
    import subprocess
    import sys
    import time

    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "def f(x):\n    return x + 1\n" * 40}) + "\n"
    big.write_text(line * 40000)
    out = tmp_path / "data" / "x"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megaspan",
            "preprocess",
            "--input",
            str(big),
            "--tokenizer",
            str(tokenizer.path),
            "--output-prefix",
            str(out),
            "--workers",
            "1",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(".x.*.tmp.bin")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == []

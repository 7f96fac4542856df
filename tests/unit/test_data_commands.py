"""The tokenizer/preprocess commands, run in-process through ``megaspan.cli.main``, and the
preprocess progress output (a bar on a terminal, whole lines in a log)."""

from __future__ import annotations

import io

import pytest

from megaspan.cli import main
from megaspan.data import DataError
from megaspan.data.commands import decode_ids


@pytest.fixture
def corpus_and_model(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 40, encoding="utf-8")
    model = tmp_path / "tok.model"
    argv = [
        "tokenizer",
        "train",
        "--input",
        str(corpus),
        "--vocab-size",
        "300",
        "--output",
        str(model),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0 and "trained" in capsys.readouterr().out
    assert main(argv) == 0 and "cached" in capsys.readouterr().out
    return corpus, model


def test_train_encode_decode_preprocess(tmp_path, capsys, monkeypatch, corpus_and_model):
    corpus, model = corpus_and_model
    text = "if y:\n\treturn 'é'\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["tokenizer", "encode", "--model", str(model)]) == 0
    ids = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(ids))
    assert main(["tokenizer", "decode", "--model", str(model)]) == 0
    assert capsys.readouterr().out == text  # exact, no added newline

    prefix = tmp_path / "out" / "corpus"
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(corpus),
                "--tokenizer",
                str(model),
                "--output-prefix",
                str(prefix),
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "1 documents" in captured.out and captured.err == ""
    assert prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()


def test_preprocess_progress_in_a_log_is_one_line_per_update(tmp_path, capsys, monkeypatch, corpus_and_model):
    """Captured stderr (not a TTY): every update is a complete line, no carriage returns."""
    _, model = corpus_and_model
    for i in range(5):
        (tmp_path / "docs" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text(f"x = {i}\n", encoding="utf-8")
    monkeypatch.setattr("megaspan.data.preprocess._LOG_EVERY_S", 0.0)  # an update per document
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(tmp_path / "docs"),
                "--tokenizer",
                str(model),
                "--output-prefix",
                str(tmp_path / "out"),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 6  # 5 updates + the final line
    assert [line.split(": ")[1].split(",")[0] for line in lines] == [f"{n} docs" for n in (1, 2, 3, 4, 5, 5)]
    assert lines[-1].startswith("preprocess out: 5 docs") and lines[-1].endswith("(done)")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_preprocess_progress_on_a_terminal_is_a_bar_redrawn_in_place(monkeypatch):
    from megaspan.data.preprocess import _Progress

    monkeypatch.setattr("megaspan.data.preprocess._PROGRESS_EVERY_S", 0.0)
    term = _Terminal()
    meter = _Progress("train", enabled=True, total=4, stream=term)
    for _ in range(2):
        meter.update(10)
    meter.close()
    out = term.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")  # one line, ended once at the close
    frames = out.rstrip("\n").split("\r")[1:]
    assert len(frames) == 3
    assert " 50% [##########..........]" in frames[1] and "100% [####################]" in frames[2]


def test_user_errors_are_one_line_exit_2(tmp_path, capsys, corpus_and_model):
    _, model = corpus_and_model
    out = tmp_path / "out"
    missing_input = ["--input", str(tmp_path / "none.txt"), "--output-prefix", str(out / "x")]
    assert main(["tokenizer", "encode", "--model", str(tmp_path / "none.model"), "x"]) == 2
    assert main(["preprocess", "--tokenizer", str(tmp_path / "none.model"), *missing_input]) == 2
    assert main(["preprocess", "--tokenizer", str(model), *missing_input]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("megaspan: error: ") for line in err), err
    assert "none.model" in err[0] and "none.model" in err[1] and "none.txt" in err[2]
    assert not out.exists()


def test_decode_rejects_bad_ids(corpus_and_model):
    _, model = corpus_and_model
    with pytest.raises(DataError, match="integers"):
        decode_ids(model, ["1", "x"])
    with pytest.raises(DataError, match="outside the vocabulary"):
        decode_ids(model, ["100000"])

"""The tokenizer/preprocess subcommands, run in-process through their argparse wiring."""

from __future__ import annotations

import argparse
import io

import pytest

from megaspan.data import DataError
from megaspan.data.commands import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megaspan")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_encode_decode_preprocess(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 40, encoding="utf-8")
    model = tmp_path / "tok.model"
    argv = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
            "--output", str(model), "--cache-dir", str(tmp_path / "cache")]
    assert _run(argv) == 0 and "trained" in capsys.readouterr().out
    assert _run(argv) == 0 and "cached" in capsys.readouterr().out

    text = "if y:\n\treturn 'é'\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert _run(["tokenizer", "encode", "--model", str(model)]) == 0
    ids = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(ids))
    assert _run(["tokenizer", "decode", "--model", str(model)]) == 0
    assert capsys.readouterr().out == text  # exact, no added newline

    prefix = tmp_path / "out" / "corpus"
    assert _run(["preprocess", "--input", str(corpus), "--tokenizer", str(model),
                 "--output-prefix", str(prefix), "--workers", "1", "--quiet"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()


@pytest.mark.parametrize(
    "argv",
    [["tokenizer", "encode", "--model", "/nonexistent.model", "x"],
     ["preprocess", "--input", "/nonexistent.txt", "--tokenizer", "/x.model",
      "--output-prefix", "/tmp/x"]],
)
def test_user_errors_are_data_errors(argv):
    with pytest.raises(DataError):
        _run(argv)

"""Hugging Face tokenizers (tokenizer.json file or directory) through load_tokenizer, build_tokenizer
and the CLI: ids are the ``tokenizers`` library's own, EOD/BOS from the tokenizer's special tokens
or an explicit choice, the identity hash, and one-line errors."""

from __future__ import annotations

import io
import pickle

import pytest

from megaspan.cli import main
from megaspan.config.schema import DataConfig, TokenizerConfig
from megaspan.data import DataError
from megaspan.data.tokenizer import build_tokenizer, load_tokenizer
from tests.helpers.hf import train_tokenizer_json

TEXT = "def f(x):\n\treturn 'é 日本' + x  # 🙂\n"


@pytest.fixture
def tok_json(tmp_path):
    return train_tokenizer_json(tmp_path / "llama" / "tokenizer.json")


def test_tokenizer_json_ids_are_the_tokenizers_librarys(tok_json):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tok_json))
    tok = load_tokenizer(tok_json)
    assert tok.tokenize(TEXT) == reference.encode(TEXT, add_special_tokens=False).ids
    assert tok.detokenize(tok.tokenize(TEXT)) == TEXT
    assert tok.eod == reference.token_to_id("<|end_of_text|>")
    assert tok.bos == reference.token_to_id("<|begin_of_text|>")
    assert tok.pad == -1 and tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    # Workers and DataLoader processes get an equal tokenizer.
    again = pickle.loads(pickle.dumps(tok))
    assert again.sha256 == tok.sha256 and again.tokenize(TEXT) == tok.tokenize(TEXT)


def test_special_tokens_from_config_file_or_explicit_and_the_hash_follows(tmp_path):
    plain = train_tokenizer_json(
        tmp_path / "a" / "tokenizer.json", specials=("<|eot_id|>", "<|end_of_text|>")
    )
    configured = train_tokenizer_json(
        tmp_path / "b" / "tokenizer.json",
        specials=("<|eot_id|>", "<|end_of_text|>"),
        config={"eos_token": {"content": "<|eot_id|>"}, "pad_token": "<|end_of_text|>"},
    )
    a, b = load_tokenizer(plain), load_tokenizer(configured)
    assert a.eod == a.vocab["<|end_of_text|>"]  # a well-known name among the special tokens
    assert b.eod == b.vocab["<|eot_id|>"] and b.pad == b.vocab["<|end_of_text|>"]  # tokenizer_config.json
    explicit = load_tokenizer(plain, eod_token="<|eot_id|>")
    assert explicit.eod == a.vocab["<|eot_id|>"]
    # Same vocabulary, another EOD: another identity (a resume would be refused).
    assert len({a.sha256, b.sha256, explicit.sha256}) == 3
    cfg = TokenizerConfig(model=str(plain), eod_token="<|eot_id|>")
    assert build_tokenizer(cfg, DataConfig(paths=["x"])).sha256 == explicit.sha256


def test_directory_saved_by_transformers_loads_like_its_file(tmp_path, tok_json):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_json), eos_token="<|end_of_text|>")
    fast.save_pretrained(tmp_path / "saved")
    from_dir, from_file = load_tokenizer(tmp_path / "saved"), load_tokenizer(tok_json)
    assert from_dir.tokenize(TEXT) == from_file.tokenize(TEXT) == fast.encode(TEXT, add_special_tokens=False)
    assert from_dir.eod == fast.eos_token_id


def test_errors_are_data_errors(tmp_path, tok_json):
    no_eos = train_tokenizer_json(tmp_path / "noeos" / "tokenizer.json", specials=("<unk>",))
    with pytest.raises(DataError, match="no end-of-sequence token.*tokenizer.eod_token"):
        load_tokenizer(no_eos)
    with pytest.raises(DataError, match="is not a token of"):
        load_tokenizer(tok_json, eod_token="<|nope|>")
    with pytest.raises(DataError, match="set tokenizer.type=huggingface"):
        load_tokenizer(tok_json, type="sentencepiece")
    junk = tmp_path / "junk.json"
    junk.write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(junk)
    with pytest.raises(DataError, match="needs tokenizer.model"):
        build_tokenizer(TokenizerConfig(type="huggingface"), DataConfig())


def test_cli_encode_decode_and_one_line_errors(tmp_path, tok_json, capsys, monkeypatch):
    assert main(["tokenizer", "encode", "--model", str(tok_json), TEXT]) == 0
    ids = capsys.readouterr().out.split()
    assert list(map(int, ids)) == load_tokenizer(tok_json).tokenize(TEXT)
    monkeypatch.setattr("sys.stdin", io.StringIO(" ".join(ids)))
    assert main(["tokenizer", "decode", "--model", str(tok_json)]) == 0
    assert capsys.readouterr().out == TEXT
    no_eos = train_tokenizer_json(tmp_path / "noeos" / "tokenizer.json", specials=("<unk>",))
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    args = ["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "out" / "x")]
    assert main(["preprocess", "--tokenizer", str(no_eos), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("megaspan: error: ") and "--eod-token" in err[0], err
    assert main(["preprocess", "--tokenizer", str(no_eos), "--eod-token", "<unk>", "--quiet", *args]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.bin", "x.idx"]

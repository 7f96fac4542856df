"""SentencePiece training, caching, exact round trip and loading."""

from __future__ import annotations

import pytest

from megaspan.config.schema import DataConfig, TokenizerConfig
from megaspan.data import DataError
from megaspan.data.corpus import stdlib_corpus, stdlib_documents
from megaspan.data.tokenizer import build_tokenizer, load_tokenizer, train_tokenizer

TRICKY = "\tdef f(x):  \r\n\t\treturn 'é日本\U0001f600'  # trailing  \n\n\x00\x7f end"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_roundtrip_and_cache_hit(tmp_path, model_type):
    corpus = stdlib_corpus("train")
    # Unigram training is ~10x slower per sentence than BPE; a small sample keeps this fast.
    sentences = 2000 if model_type == "bpe" else 400
    kwargs = dict(vocab_size=512, model_type=model_type, max_train_sentences=sentences, cache_dir=tmp_path)
    tok = train_tokenizer(corpus, **kwargs)
    assert not tok.from_cache and tok.vocab_size == 512
    assert tok.path.parent == tmp_path / "tokenizers"
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3) and tok.eos == tok.eod

    mtime = tok.path.stat().st_mtime_ns
    again = train_tokenizer(corpus, **kwargs)
    assert again.from_cache and again.path == tok.path and again.sha256 == tok.sha256
    assert tok.path.stat().st_mtime_ns == mtime  # not rewritten

    # Exact round trip on real held-out source text and on whitespace/unicode edge cases.
    for text in [*stdlib_documents("valid"), TRICKY]:
        ids = tok.tokenize(text)
        assert tok.eod not in ids and tok.detokenize(ids) == text
    assert tok.detokenize(tok.tokenize("x") + [tok.eod, tok.pad]) == "x"


def test_cache_key_tracks_content_and_params(tmp_path):
    docs = ["alpha beta gamma\n" * 20, "delta epsilon\n" * 20]
    first = train_tokenizer(docs, vocab_size=300, cache_dir=tmp_path)
    assert train_tokenizer(iter(docs), vocab_size=300, cache_dir=tmp_path).from_cache
    assert not train_tokenizer(docs + ["zeta\n"], vocab_size=300, cache_dir=tmp_path).from_cache
    other = train_tokenizer(docs, vocab_size=310, cache_dir=tmp_path)
    assert not other.from_cache and other.path != first.path


def test_load_existing_model_and_build_tokenizer(tmp_path):
    trained = train_tokenizer(["hello world\n" * 50], vocab_size=300, cache_dir=tmp_path)
    copy = tmp_path / "mine.model"
    copy.write_bytes(trained.path.read_bytes())
    loaded = load_tokenizer(copy)
    assert loaded.tokenize("hello world") == trained.tokenize("hello world")
    assert loaded.unique_identifiers == trained.unique_identifiers  # content-, not path-based
    cfg = TokenizerConfig(model=str(copy))
    assert build_tokenizer(cfg, DataConfig()).sha256 == trained.sha256


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda d: load_tokenizer(d / "absent.model"), "not found"),
        (lambda d: train_tokenizer([], vocab_size=300, cache_dir=d), "empty"),
        (lambda d: train_tokenizer(["abc\n"], vocab_size=100, cache_dir=d), "too small"),
        (lambda d: build_tokenizer(TokenizerConfig(), DataConfig(paths=["x"])), "tokenizer.model"),
    ],
)
def test_errors_are_one_line(tmp_path, call, fragment):
    with pytest.raises(DataError) as info:
        call(tmp_path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_not_a_model(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        load_tokenizer(junk)

"""Tokenizer training is reproducible: same corpus and options -> byte-identical ``.model``.

Each training runs in its own process (a fresh sentencepiece random state, as two separate
runs of ``megaspan`` would have); before the fix three trainings on identical input gave three
different models under the same cache key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megaspan.data.tokenizer import tokenizer_hash

_TRAIN = """
import sys
from megaspan.data.corpus import stdlib_corpus
from megaspan.data.tokenizer import train_tokenizer
# More sentences than max_train_sentences, so the sampling path is exercised.
corpus = list(stdlib_corpus("train"))[:200]
tok = train_tokenizer(corpus, vocab_size=1000, max_train_sentences=1500, cache_dir=sys.argv[1])
print(tok.path)
"""


def _train(cache: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN, str(cache)], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def test_training_twice_gives_byte_identical_models(tmp_path: Path) -> None:
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert first.name == second.name  # same cache key
    assert first.read_bytes() == second.read_bytes()
    assert tokenizer_hash(first) == tokenizer_hash(second)


def test_tokenizer_hash_is_the_content_hash(tmp_path: Path) -> None:
    a, b = tmp_path / "a.model", tmp_path / "b.model"
    a.write_bytes(b"one")
    b.write_bytes(b"one")
    assert tokenizer_hash(a) == tokenizer_hash(b)
    b.write_bytes(b"two")
    assert tokenizer_hash(a) != tokenizer_hash(b)

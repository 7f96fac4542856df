"""Hugging Face material made inside the tests (nothing is downloaded): a byte-level BPE
``tokenizer.json`` trained by the ``tokenizers`` library, in the Llama-3 / GPT-NeoX layout."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SAMPLE_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. é 日本語 🙂\n",
    "import os\nprint(os.getcwd())\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
] * 20


def train_tokenizer_json(
    path: Path,
    texts: Iterable[str] = SAMPLE_TEXTS,
    *,
    vocab_size: int = 400,
    specials: tuple[str, ...] = ("<|begin_of_text|>", "<|end_of_text|>"),
    config: dict | None = None,
) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as ``path`` (a tokenizer.json); ``config``
    is written as a tokenizer_config.json next to it (HF's special-token file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    if config is not None:
        (path.parent / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path

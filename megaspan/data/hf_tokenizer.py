"""Hugging Face tokenizers: a ``tokenizer.json`` file or a local tokenizer directory.

Encoding is the ``tokenizers`` library's own (the Rust implementation every HF fast tokenizer
wraps), so ids are exactly those of the tokenizer the user brings (Llama-3, GPT-NeoX, Qwen, ...).
A directory without a ``tokenizer.json`` (only a slow sentencepiece/BPE tokenizer) is converted by
``transformers``' ``AutoTokenizer(use_fast=True)`` and its fast backend is used.

Special tokens, and why from where:

* **End of document** (appended after every document, Megatron's ``eod``): ``tokenizer.eod_token``
  when set; else the ``eos_token`` of ``tokenizer_config.json`` / ``special_tokens_map.json`` next
  to the ``tokenizer.json`` (how Llama-3, Qwen and NeoX ship theirs); else the one special token of
  the vocabulary with a well-known end-of-text name (:data:`EOS_NAMES`). No EOS is an error: the
  documents of a packed sample could not be told apart.
* **BOS** the same way (``bos_token``, :data:`BOS_NAMES`), optional: preprocessing never adds it
  (as Megatron's ``preprocess_data.py`` does not), it is reported for completeness.
* **pad** is the tokenizer's pad token unless that equals EOD (GPT-2 style), then none (-1), so
  Megatron's GPTDataset never masks real end-of-document tokens as padding.

Identity: :attr:`HuggingFaceTokenizer.sha256` hashes ``tokenizer.json``, the special-token files
and the resolved EOD/BOS ids, so a run resumed with another tokenizer (or the same one with another
EOD) is refused, as for sentencepiece.

Importing this module imports neither torch, megatron nor ``tokenizers`` (that happens on load).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from megaspan.data import DataError

EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
"""End-of-text tokens of common tokenizers (Llama-3, GPT-2/NeoX/Qwen, Llama-2/Mistral, Gemma)."""
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]")
_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class HuggingFaceTokenizer:
    """A loaded HF tokenizer with the interface megaspan and Megatron's GPTDataset use (the same
    attributes as :class:`~megaspan.data.tokenizer.SentencePieceTokenizer`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        eod_token: str | None = None,
        bos_token: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.from_cache = False
        self._eod_token, self._bos_token = eod_token, bos_token
        self._tok, hashed = _load(self.path)
        config = _special_token_config(self.path.parent if self.path.is_file() else self.path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._eod = self._special(vocab, eod_token, config.get("eos_token"), EOS_NAMES, "eod_token")
        if self._eod is None:
            raise DataError(
                f"tokenizer {self.path} has no end-of-sequence token (no eos_token in "
                f"tokenizer_config.json, none of {', '.join(EOS_NAMES)} in its vocabulary); name "
                f"the token that ends a document with tokenizer.eod_token=TOKEN (--eod-token TOKEN)"
            )
        bos = self._special(vocab, bos_token, config.get("bos_token"), BOS_NAMES, "bos_token")
        self._bos = -1 if bos is None else bos
        pad = config.get("pad_token")
        self._pad = vocab.get(pad, -1) if pad else -1
        if self._pad == self._eod:
            self._pad = -1
        digest = hashlib.sha256()
        for data in hashed:
            digest.update(len(data).to_bytes(8, "little") + data)
        digest.update(f"eod={self._eod} bos={self._bos}".encode())
        self.sha256 = digest.hexdigest()

    def __reduce__(self) -> tuple[type, tuple, dict]:
        # The Rust tokenizer is rebuilt from its files in DataLoader / preprocessing workers.
        return (_rebuild, (self.path, self._eod_token, self._bos_token), {})

    def _special(
        self,
        vocab: dict[str, int],
        explicit: str | None,
        configured: str | None,
        names: Sequence[str],
        option: str,
    ) -> int | None:
        if explicit is not None:
            if explicit not in vocab:
                raise DataError(
                    f"tokenizer.{option}={explicit!r} is not a token of {self.path}; "
                    f"give a token string from its vocabulary (e.g. one of its added special tokens)"
                )
            return vocab[explicit]
        if configured and configured in vocab:
            return vocab[configured]
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for name in names:
            if name in vocab and (name in specials or not specials):
                return vocab[name]
        return None

    @property
    def vocab_size(self) -> int:
        """Ids are ``0 .. vocab_size-1`` (added tokens included)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unk(self) -> int:
        return -1

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        ids = {"bos_token": self._bos, "eos_token": self._eod, "pad_token": self._pad}
        return {name: i for name, i in ids.items() if i >= 0}

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def unique_identifiers(self) -> OrderedDict[str, str]:
        """Megatron's dataset-index cache key: the content hash, not the path."""
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("model_sha256", self.sha256)]
        )

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added (preprocessing appends :attr:`eod`)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _rebuild(path: Path, eod_token: str | None, bos_token: str | None) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(path, eod_token=eod_token, bos_token=bos_token)


def _load(path: Path):  # -> (tokenizers.Tokenizer, [bytes hashed for identity])
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            "a Hugging Face tokenizer needs the tokenizers package: pip install 'megaspan[data]'"
        ) from None
    if path.is_dir():
        special = [(path / name).read_bytes() for name in _SPECIAL_FILES if (path / name).is_file()]
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            return _load_with_transformers(path), special + _dir_bytes(path)
    elif not path.is_file():
        raise DataError(
            f"tokenizer {path} not found; give a tokenizer.json file, a local Hugging Face "
            f"tokenizer directory, or a sentencepiece .model"
        )
    else:
        special = [(path.parent / n).read_bytes() for n in _SPECIAL_FILES if (path.parent / n).is_file()]
    data = path.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # the Rust side raises plain Exception subclasses
        raise DataError(f"{path} is not a Hugging Face tokenizer.json ({str(err).splitlines()[0]})") from None
    return tok, [data, *special]


def _load_with_transformers(path: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(
            f"{path} has no tokenizer.json; converting its slow tokenizer needs transformers "
            f"(pip install transformers), or save it with a fast tokenizer first"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a loadable Hugging Face tokenizer directory ({err})") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{path}: transformers has no fast tokenizer for it; save a tokenizer.json")
    return tok.backend_tokenizer


def _dir_bytes(path: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()]


def _special_token_config(directory: Path) -> dict[str, str]:
    """``eos_token``/``bos_token``/``pad_token`` from the JSON files HF saves next to tokenizer.json
    (a string, or a dict with ``content``); tokenizer_config.json wins over special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in reversed(_SPECIAL_FILES):
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{file} is not valid JSON; fix or remove it") from None
        for key in ("eos_token", "bos_token", "pad_token"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def looks_like_huggingface(path: str | os.PathLike[str]) -> bool:
    """Whether ``tokenizer.model`` names an HF tokenizer: a ``.json`` file or a directory."""
    p = Path(path)
    return p.is_dir() or p.suffix == ".json"

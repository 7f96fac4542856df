"""SentencePiece tokenizer: train (cached by content hash), load, and adapt to Megatron datasets.

Training choices, and why:

* **Exact round trip.** ``normalization_rule_name="identity"``, ``add_dummy_prefix=False``,
  ``remove_extra_whitespaces=False`` and ``byte_fallback=True`` make
  ``detokenize(tokenize(text)) == text`` for every string: nothing is normalized, no space is
  invented or collapsed, and characters outside the vocabulary become ``<0xNN>`` byte pieces
  instead of ``<unk>``. Code depends on exact whitespace, so anything lossy would corrupt it.
* **Newlines and indentation are learnable.** Training "sentences" are chunks of
  :data:`LINES_PER_SENTENCE` consecutive lines *including* their ``\\n``, and
  ``allow_whitespace_only_pieces=True`` lets runs of indentation spaces become single pieces.
  Training one line per sentence would never show the trainer a newline.
* **Fixed special ids**: ``<unk>``=0, ``<s>``=1, ``</s>``=2 (the end-of-document id, ``eod``),
  ``<pad>``=3. ``pad`` differs from ``eod`` so Megatron's GPTDataset does not warn about a pad
  collision and never masks real end-of-document tokens.
* **Fast on 2 cores**: at most ``max_train_sentences`` chunks are sampled. BPE on the whole
  stdlib corpus takes a few seconds; unigram is ~10x slower per sentence, so keep
  ``max_train_sentences`` small (a few thousand) when iterating with unigram.
* **Deterministic**: the same corpus and options give a byte-identical ``.model`` (the cache key
  promises it, and a resumed run checks the model's :func:`tokenizer_hash`). SentencePiece's own
  sampler (``input_sentence_size`` + ``shuffle_input_sentence``) differs between runs even after
  ``set_random_generator_seed``, and the learned merges depend on ``num_threads``; so megaspan
  samples the sentences itself (a reservoir with a fixed seed, in corpus order), hands
  SentencePiece exactly those with its sampling off, and trains with one thread.

Cache layout: ``<cache_dir>/tokenizers/spm-<model_type>-v<vocab_size>-<key>.model`` where ``key``
hashes the corpus content and every training parameter (and the sentencepiece version), so a
changed corpus or parameter trains a new model and an unchanged one is reused.

Importing this module does not import torch or megatron (the CLI and worker processes stay fast);
:class:`SentencePieceTokenizer` satisfies by duck typing the attributes Megatron's ``GPTDataset``
reads (``vocab_size``, ``eod``, ``eos``, ``pad``, ``special_tokens_dict``, ``unique_identifiers``)
and :mod:`megaspan.data.datasets` registers it as a virtual ``MegatronTokenizerBase``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sentencepiece as spm

from megaspan.data import DataError
from megaspan.data.corpus import stdlib_corpus

if TYPE_CHECKING:
    from megaspan.config.schema import DataConfig, TokenizerConfig
    from megaspan.data.hf_tokenizer import HuggingFaceTokenizer

ModelType = Literal["bpe", "unigram"]
TokenizerType = Literal["sentencepiece", "huggingface"]

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
LINES_PER_SENTENCE = 8
"""Lines per training sentence; enough context for pieces like ``"):\\n"`` to be learned."""
MAX_SENTENCE_BYTES = 16384
"""SentencePiece skips longer training sentences (rare: generated data tables)."""
TRAIN_SEED = 1234
_CACHE_FORMAT = 2
"""Bump to invalidate every cached tokenizer when the training recipe changes."""


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The megaspan cache root: ``cache_dir`` if given, else ``$MEGASPAN_CACHE_DIR``, else
    ``~/.cache/megaspan``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MEGASPAN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megaspan"


class SentencePieceTokenizer:
    """A loaded SentencePiece model exposing the tokenizer interface megaspan and Megatron use.

    Attributes:
        path: the ``.model`` file.
        from_cache: True when :func:`train_tokenizer` found this model in the cache instead of
            training it (lets callers and tests observe cache hits honestly).
    """

    def __init__(self, path: str | os.PathLike[str], *, from_cache: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"tokenizer model {self.path} not found; train one with "
                f"`megaspan tokenizer train --output {self.path}`"
            )
        data = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise DataError(f"{self.path} is not a sentencepiece model") from None
        if self._sp.eos_id() < 0:
            raise DataError(
                f"tokenizer model {self.path} has no </s> piece, so documents cannot be "
                f"delimited; retrain it with `megaspan tokenizer train`"
            )
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.from_cache = from_cache

    def __reduce__(self) -> tuple[type, tuple[Path]]:
        # SentencePieceProcessor does not pickle; DataLoader workers under spawn need this.
        return (type(self), (self.path,))

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are ``0 .. vocab_size-1``); may be below the requested size."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id appended after every document (the ``</s>`` piece)."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """Padding id, or -1 (Megatron's "no pad token") if the model has none."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        """Special ids by Megatron's names; GPTDataset uses it to detect pad collisions."""
        ids = {"unk_token": self.unk, "bos_token": self.bos, "eos_token": self.eos, "pad_token": self.pad}
        return {name: i for name, i in ids.items() if i >= 0}

    @property
    def vocab(self) -> dict[str, int]:
        """Piece string to id."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def unique_identifiers(self) -> OrderedDict[str, str]:
        """What Megatron hashes into its dataset-index cache key.

        The model's content hash rather than its path, so caches survive moving the file and
        are invalidated when a different model is written to the same path.
        """
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("model_sha256", self.sha256)]
        )

    def tokenize(self, text: str) -> list[int]:
        """Encode text to ids (no BOS/EOS added; preprocessing appends :attr:`eod` itself)."""
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text; control ids (eod, pad) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])


if TYPE_CHECKING:
    Tokenizer = SentencePieceTokenizer | HuggingFaceTokenizer
    """What :func:`load_tokenizer` returns: both have the same attributes and methods."""


def load_tokenizer(
    path: str | os.PathLike[str],
    *,
    type: TokenizerType | None = None,
    eod_token: str | None = None,
    bos_token: str | None = None,
) -> Tokenizer:
    """Load an existing tokenizer (raises :class:`DataError` if missing/invalid).

    ``type`` None infers it from ``path``: a ``.json`` file or a directory is a Hugging Face
    tokenizer, anything else a sentencepiece ``.model``. ``eod_token``/``bos_token`` name the
    special tokens of a Hugging Face tokenizer (sentencepiece models have fixed ones).
    """
    from megaspan.data.hf_tokenizer import HuggingFaceTokenizer, looks_like_huggingface

    if type is None:
        type = "huggingface" if looks_like_huggingface(path) else "sentencepiece"
    if type == "huggingface":
        return HuggingFaceTokenizer(path, eod_token=eod_token, bos_token=bos_token)
    if type != "sentencepiece":
        raise DataError(f"unknown tokenizer.type {type!r}; use 'sentencepiece' or 'huggingface'")
    if eod_token is not None or bos_token is not None:
        raise DataError(
            "tokenizer.eod_token/bos_token apply to Hugging Face tokenizers; a sentencepiece model "
            "uses its own </s> and <s> (unset them)"
        )
    if looks_like_huggingface(path):
        raise DataError(
            f"tokenizer.type=sentencepiece but {path} is a Hugging Face tokenizer; set "
            f"tokenizer.type=huggingface (or leave it unset to infer it)"
        )
    return SentencePieceTokenizer(path)


def train_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int,
    model_type: ModelType = "bpe",
    max_train_sentences: int = 200_000,
    cache_dir: str | os.PathLike[str] | None = None,
) -> SentencePieceTokenizer:
    """Train a tokenizer on ``corpus``, or return the cached one trained on identical input.

    ``corpus`` is iterated twice (hash, then train); a one-shot iterator is materialized in
    memory first, so pass a re-iterable (a list or :class:`~megaspan.data.corpus.Corpus`) for
    large corpora. Several processes may call this at once: the model is written to a temp
    file and renamed, so readers never see a partial file (but each would train; see
    :func:`build_tokenizer` for the rank-0-first pattern).
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"unknown tokenizer model_type {model_type!r}; use 'bpe' or 'unigram'")
    if isinstance(corpus, Iterator):
        corpus = list(corpus)
    options = _trainer_options(vocab_size, model_type, max_train_sentences)
    key = _cache_key(corpus, options)
    target = default_cache_dir(cache_dir) / "tokenizers" / f"spm-{model_type}-v{vocab_size}-{key}.model"
    if target.is_file():
        try:
            return SentencePieceTokenizer(target, from_cache=True)
        except DataError:
            pass  # a corrupt cache entry is retrained and replaced below
    model = io.BytesIO()
    spm.set_random_generator_seed(TRAIN_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sample_sentences(corpus, max_train_sentences)),
            model_writer=model,
            **{k: v for k, v in options.items() if k != "megaspan_max_sentences"},
        )
    except RuntimeError as err:
        raise DataError(_describe_training_error(err, vocab_size)) from None
    atomic_write_bytes(target, model.getvalue())
    return SentencePieceTokenizer(target)


def build_tokenizer(tokenizer_cfg: TokenizerConfig, data_cfg: DataConfig) -> Tokenizer:
    """The run's tokenizer: ``tokenizer.model`` (sentencepiece or Hugging Face, see
    :func:`load_tokenizer`) if set, else a sentencepiece model trained on the stdlib corpus.

    Distributed-aware: when ``torch.distributed`` is initialized, rank 0 trains (or finds the
    cache) first and the other ranks load the cached file after a barrier, so N ranks do not
    train N times. Must then be called on every rank.
    """
    if tokenizer_cfg.model is not None:
        return load_tokenizer(
            tokenizer_cfg.model,
            type=tokenizer_cfg.type,
            eod_token=tokenizer_cfg.eod_token,
            bos_token=tokenizer_cfg.bos_token,
        )
    if tokenizer_cfg.type == "huggingface":
        raise DataError(
            "tokenizer.type=huggingface needs tokenizer.model=PATH (a tokenizer.json or a local "
            "Hugging Face tokenizer directory); megaspan trains only sentencepiece models itself"
        )
    if data_cfg.paths:
        raise DataError(
            "tokenizer.model is required when data.paths is set (the .bin/.idx files were "
            "tokenized with a specific model); pass tokenizer.model=PATH/TO/MODEL.model"
        )

    def train() -> SentencePieceTokenizer:
        return train_tokenizer(
            stdlib_corpus("train"),
            vocab_size=tokenizer_cfg.vocab_size,
            model_type=tokenizer_cfg.model_type,
            max_train_sentences=tokenizer_cfg.max_train_sentences,
            cache_dir=data_cfg.cache_dir,
        )

    return rank_zero_first(train)


def rank_zero_first[T](fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0, barrier, then on the other ranks (which hit rank 0's cache).

    Outside ``torch.distributed`` (or before it is imported) this is just ``fn()``. torch is
    looked up in ``sys.modules`` so that this module never imports it.
    """
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return fn()
    result = fn() if dist.get_rank() == 0 else None
    dist.barrier()
    return result if dist.get_rank() == 0 else fn()


def _trainer_options(vocab_size: int, model_type: ModelType, max_sentences: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        # Sampling is done by _sample_sentences (deterministic); see the module docstring.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=1,  # the merges depend on the thread count
        minloglevel=2,
        # Not a sentencepiece option (removed before training); part of the cache key.
        megaspan_max_sentences=max_sentences,
    )


def _cache_key(corpus: Iterable[str], options: dict) -> str:
    """Hash of the corpus content and the recipe (every option that changes the model)."""
    digest = hashlib.sha256()
    recipe = {k: v for k, v in options.items() if k != "minloglevel"}
    recipe.update(format=_CACHE_FORMAT, lines=LINES_PER_SENTENCE, seed=TRAIN_SEED, spm=spm.__version__)
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    count = 0
    for text in corpus:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        count += 1
    if count == 0:
        raise DataError("tokenizer training corpus is empty; give --input files with text")
    return digest.hexdigest()[:16]


def _sample_sentences(corpus: Iterable[str], max_sentences: int) -> list[str]:
    """At most ``max_sentences`` training sentences, the same ones on every call: a reservoir
    sample (Algorithm R) with a fixed seed, returned in corpus order."""
    rng = random.Random(TRAIN_SEED)
    reservoir: list[tuple[int, str]] = []
    for index, sentence in enumerate(_training_sentences(corpus)):
        if len(reservoir) < max_sentences:
            reservoir.append((index, sentence))
        elif (slot := rng.randrange(index + 1)) < max_sentences:
            reservoir[slot] = (index, sentence)
    return [sentence for _, sentence in sorted(reservoir)]


def tokenizer_hash(path: str | os.PathLike[str]) -> str:
    """Content hash (SHA-256 hex) of a tokenizer ``.model`` file: what the run and its checkpoints
    record, so a resume with a different (e.g. re-trained) tokenizer is detected."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _training_sentences(corpus: Iterable[str]) -> Iterator[str]:
    for text in corpus:
        lines = text.splitlines(keepends=True)
        for start in range(0, len(lines), LINES_PER_SENTENCE):
            yield "".join(lines[start : start + LINES_PER_SENTENCE])


def _describe_training_error(err: RuntimeError, vocab_size: int) -> str:
    message = str(err)
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if needed:
        return (
            f"tokenizer vocab_size {vocab_size} is too small for this corpus: it needs at least "
            f"{needed.group(1)} (256 byte pieces + 4 specials + its characters); raise vocab_size"
        )
    return f"sentencepiece training failed: {message.splitlines()[0] if message else err!r}"


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a temp file and rename: readers see old or new, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

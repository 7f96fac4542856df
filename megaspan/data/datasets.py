"""Build Megatron ``GPTDataset`` train/valid/test splits (blended) from a :class:`DataConfig`.

All sampling, shuffling, packing and blending is Megatron's own
(``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` + ``BlendedDataset``); this module only turns
megaspan's config into a ``GPTDatasetConfig`` and rejects inputs that Megatron would otherwise
answer with an assertion, a multi-line traceback, or an endless loop.

Two sources:

* ``data.paths`` set: every prefix feeds every split through ``data.split`` (Megatron's
  ``blend`` + ``split``). With several prefixes and ``data.weights=None`` the weights are the
  prefixes' token counts, passed explicitly so that Megatron builds as many samples as
  requested (with ``weights=None`` it would stop at one epoch of each dataset).
* ``data.paths`` empty: the embedded stdlib corpus, preprocessed into the cache on first use.
  Its train prefix feeds training and the held-out-by-file valid prefix feeds validation
  (Megatron's ``blend_per_split``); there is no test split and ``data.split`` is not used.

Distributed use: call :func:`build_datasets` on **every** rank. When ``torch.distributed`` is
initialized, Megatron builds and caches the index files on rank 0 first, barriers, then loads
them on the other ranks; the stdlib preprocessing here follows the same rank-0-first pattern.
Ranks for which ``is_built_on_rank()`` is False get ``None`` datasets (Megatron's convention:
e.g. only TP rank 0 of the first/last pipeline stage reads data and broadcasts it).

Cache layout under ``data.cache_dir`` (default ``~/.cache/megaspan``)::

    tokenizers/spm-<type>-v<vocab>-<hash>.model    trained tokenizers
    stdlib/<hash>/{train,valid}.{bin,idx}          the preprocessed embedded corpus
    index_cache/<content>/<md5>-GPTDataset-<split>-*.npy   Megatron's document/sample/shuffle
                                                   indices, per data content (.idx hash, sizes)
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizerBase
from torch.utils.data import Dataset

from megaspan.data import DataError
from megaspan.data.hf_tokenizer import HuggingFaceTokenizer
from megaspan.data.identity import cache_key, data_identity
from megaspan.data.preprocess import index_stats, is_complete, preprocess_stdlib
from megaspan.data.tokenizer import SentencePieceTokenizer, default_cache_dir, rank_zero_first

if TYPE_CHECKING:
    from megaspan.config.schema import DataConfig
    from megaspan.data.tokenizer import Tokenizer

# Megatron annotates GPTDatasetConfig.tokenizer as MegatronTokenizerBase; our tokenizer provides
# everything the datasets read without importing megatron, so declare it a virtual subclass.
MegatronTokenizerBase.register(SentencePieceTokenizer)
MegatronTokenizerBase.register(HuggingFaceTokenizer)

SPLIT_NAMES = ("train", "valid", "test")
Blend = tuple[list[str], list[float] | None]


def build_datasets(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    *,
    is_built_on_rank: Callable[[], bool] = lambda: True,
    create_attention_mask: bool = True,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Return ``(train, valid, test)`` datasets; a split is ``None`` when it has no data.

    ``num_samples`` is the number of ``seq_length``-token samples wanted per split (Megatron
    repeats epochs as needed); ``None`` means exactly one epoch and is not allowed together
    with explicit ``data.weights``. Each sample is a dict of ``tokens``, ``labels``,
    ``loss_mask``, ``position_ids`` (and ``attention_mask`` when ``create_attention_mask``),
    plus ``dataset_id`` when several prefixes are blended. Raises :class:`DataError` for
    missing/empty/incomplete data, a malformed split, or a weights/paths mismatch.
    """
    if len(num_samples) != 3:
        raise DataError(f"num_samples must be (train, valid, test), got {tuple(num_samples)}")
    cache = default_cache_dir(data_cfg.cache_dir)
    if data_cfg.paths:
        split_source = {
            "blend": _user_blend(data_cfg, num_samples),
            "split": _check_split(data_cfg.split, data_cfg.paths),
        }
    else:
        if data_cfg.weights is not None:
            raise DataError("data.weights is set but data.paths is empty; give one path per weight")
        prefixes = rank_zero_first(lambda: preprocess_stdlib(tokenizer, cache))
        split_source = {"blend_per_split": [([prefixes["train"]], None), ([prefixes["valid"]], None), None]}
    train_prefixes = data_cfg.paths or [prefixes["train"]]
    _check_index_size([index_stats(str(p))[:2] for p in train_prefixes], num_samples[0], seq_length)
    # Megatron names its index files after the dataset path, not its content: data replaced
    # under the same prefix would be read through the old document/sample indices (wrong
    # samples, then a crash). One cache subdirectory per content (.idx hash, sizes) instead.
    path_to_cache = cache / "index_cache" / cache_key(dataset_identity(data_cfg, tokenizer))
    config = _gpt_config(
        data_cfg, tokenizer, seq_length, seed, path_to_cache, create_attention_mask, **split_source
    )
    with _index_cache_lock(cache / "index_cache"):  # one lock for every content's subdirectory
        train, valid, test = BlendedMegatronDatasetBuilder(
            GPTDataset, list(num_samples), is_built_on_rank, config
        ).build()
    return train, valid, test


MAX_EPOCHS = 1_000_000
"""Megatron counts epochs one by one in Python (``GPTDataset._get_num_epochs``) and then builds
an index of every document of every epoch: ``training.steps=10**15`` hung there silently."""
INDEX_BYTES_PER_SAMPLE = 24  # sample index (2 x int64) + shuffle index (int64)
INDEX_BYTES_PER_DOCUMENT = 4  # document index, once per document per epoch (int32)


def _check_index_size(stats: Sequence[tuple[int, int]], num_samples: int | None, seq_length: int) -> None:
    """Refuse a sample count whose Megatron index could not be built in this machine's memory.

    ``stats`` are (documents, tokens) of the datasets the training split draws from (all of
    each, so the estimate is a lower bound).
    """
    import os

    documents, tokens = sum(d for d, _ in stats), sum(t for _, t in stats)
    if not num_samples or not tokens:
        return
    needed = num_samples * seq_length
    epochs = -(-needed // tokens)
    index = num_samples * INDEX_BYTES_PER_SAMPLE + epochs * documents * INDEX_BYTES_PER_DOCUMENT
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if epochs > MAX_EPOCHS or index > memory // 2:
        raise DataError(
            f"training.steps x global_batch_size = {num_samples} samples of {seq_length} tokens is {epochs} "
            f"epochs of the {tokens}-token training data; its sample index would take "
            f"{index / 2**30:.1f} GiB (this machine has {memory / 2**30:.0f} GiB){' and more than ' + str(MAX_EPOCHS) + ' epochs' if epochs > MAX_EPOCHS else ''}: "
            "lower training.steps or add data"
        )


def dataset_identity(data_cfg: DataConfig, tokenizer: SentencePieceTokenizer) -> dict:
    """The :func:`megaspan.data.identity.data_identity` record of the data ``data_cfg`` names
    (each prefix's sizes and ``.idx`` hash, the weights and split), recorded in every checkpoint.
    Call after :func:`build_datasets` (which validates the paths), on every rank when a process
    group exists: rank 0 hashes (once per file version) and broadcasts."""
    cache = default_cache_dir(data_cfg.cache_dir)
    memo = cache / "index_cache"  # the .idx hashes, kept beside the indices they name
    if data_cfg.paths:
        return data_identity([str(p) for p in data_cfg.paths], data_cfg.weights, data_cfg.split, memo)
    prefixes = rank_zero_first(lambda: preprocess_stdlib(tokenizer, cache))
    return data_identity([prefixes["train"], prefixes["valid"]], None, None, memo)


_VALID_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def build_valid_sets(
    data_cfg: DataConfig,
    tokenizer: SentencePieceTokenizer,
    seq_length: int,
    seed: int,
    num_samples: int,
    *,
    is_built_on_rank: Callable[[], bool] = lambda: True,
    create_attention_mask: bool = True,
) -> dict[str, Dataset | None]:
    """``data.valid_sets`` as ``{name: GPTDataset}``: all of each prefix is validation data
    (``num_samples`` samples, the main validation set's count). Same sampling as the main split."""
    sets: dict[str, Dataset | None] = {}
    for name, prefix in data_cfg.valid_sets.items():
        if not _VALID_SET_NAME.match(str(name)):
            raise DataError(
                f"data.valid_sets: name '{name}' must be letters, digits, '_', '-' or '.' (it becomes the "
                "TensorBoard tag valid/<name>/loss)"
            )
        if not isinstance(prefix, str) or not prefix:
            raise DataError(
                f"data.valid_sets.{name}: expected an indexed-dataset prefix (path without .bin/.idx)"
            )
        if not is_complete(Path(prefix)):
            raise DataError(
                f"data.valid_sets.{name}: {prefix}.bin/.idx not found or incomplete; write it with megaspan preprocess"
            )
        # Keyed on content like the main split's indices: a set replaced under the same prefix
        # gets fresh indices, never the old ones.
        index_cache = default_cache_dir(data_cfg.cache_dir) / "index_cache"
        path_to_cache = index_cache / cache_key(data_identity([prefix], None, None, index_cache))
        config = _gpt_config(
            data_cfg,
            tokenizer,
            seq_length,
            seed,
            path_to_cache,
            create_attention_mask,
            blend_per_split=[None, ([prefix], None), None],
        )
        with _index_cache_lock(index_cache):
            _, sets[name], _ = BlendedMegatronDatasetBuilder(
                GPTDataset, [0, num_samples, 0], is_built_on_rank, config
            ).build()
    return sets


def _gpt_config(
    data_cfg: DataConfig,
    tokenizer,
    seq_length: int,
    seed: int,
    path_to_cache: Path,
    create_attention_mask: bool,
    **split_source,
) -> GPTDatasetConfig:
    """Megatron's dataset config from ``data.*``; ``split_source`` is the blend (per split)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=str(path_to_cache),
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **split_source,
    )


@contextlib.contextmanager
def _index_cache_lock(path_to_cache: Path) -> Iterator[None]:
    """Serialize index-cache builds of *different jobs* sharing one cache dir.

    Megatron writes its ``.npy`` index files one by one, and a second job seeing some of them
    skips building and reads a file that is not there yet (seen with concurrent sweep cells).
    Only global rank 0 takes the lock: within a job Megatron builds on rank 0 first and the
    others read after a barrier *inside* ``build()``, so locking on every rank would deadlock.
    """
    import sys

    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    path_to_cache.mkdir(parents=True, exist_ok=True)
    with open(path_to_cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _user_blend(data_cfg: DataConfig, num_samples: Sequence[int | None]) -> Blend:
    """Validate ``data.paths``/``data.weights`` and return Megatron's ``(prefixes, weights)``."""
    prefixes = [str(p) for p in data_cfg.paths]
    token_counts = [_token_count(p) for p in prefixes]
    weights = data_cfg.weights
    if weights is not None:
        if len(weights) != len(prefixes):
            raise DataError(
                f"data.weights has {len(weights)} entries but data.paths has {len(prefixes)};"
                f" give one weight per path (or weights=null for size-proportional blending)"
            )
        if any(not w > 0 for w in weights):
            raise DataError(f"data.weights must all be positive, got {list(weights)}")
        if any(n is None for n in num_samples):
            raise DataError("explicit data.weights need a sample count for every split")
        return prefixes, [float(w) for w in weights]
    if len(prefixes) > 1 and all(n is not None for n in num_samples):
        return prefixes, [float(n) for n in token_counts]
    return prefixes, None


def _token_count(prefix: str) -> int:
    """Tokens in an indexed dataset; raises :class:`DataError` if it is missing, partial or empty."""
    missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not Path(f"{prefix}{s}").is_file()]
    if missing:
        raise DataError(
            f"data path {prefix!r}: {' and '.join(missing)} not found; create it with"
            f" `megaspan preprocess --input FILES --tokenizer MODEL --output-prefix {prefix}`"
            f" (data.paths takes prefixes, without .bin/.idx)"
        )
    if is_complete(prefix):
        return index_stats(prefix)[1]
    try:
        empty = index_stats(prefix)[0] == 0
    except (AssertionError, ValueError, OSError):
        empty = False
    problem = "holds no documents" if empty else "is incomplete or corrupt (.bin disagrees with .idx)"
    raise DataError(
        f"data path {prefix!r} {problem}; re-run"
        f" `megaspan preprocess --input FILES --tokenizer MODEL --output-prefix {prefix}`"
    )


def _check_split(split: str, prefixes: Sequence[str]) -> str:
    """Reject malformed split strings, and splits that give some split zero documents.

    A split with zero documents is not an error in Megatron: ``GPTDataset`` then loops forever
    looking for tokens (``_get_num_epochs``), so it must be caught here.
    """
    try:
        if not re.fullmatch(r"\s*[0-9.]+(\s*,\s*[0-9.]+){0,2}\s*", split):
            raise ValueError
        positive = sum(float(x) for x in split.split(",")) > 0
    except ValueError:
        raise DataError(f"data.split {split!r} is not 'train,valid,test' weights like '98,2,0'") from None
    if not positive:
        raise DataError(f"data.split {split!r} has no positive weight")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        documents = index_stats(prefix)[0]
        for name, bounds in zip(SPLIT_NAMES, matrix):
            if bounds is None:
                continue
            if int(round(bounds[1] * documents)) - int(round(bounds[0] * documents)) == 0:
                raise DataError(
                    f"data path {prefix!r} has {documents} documents, too few for"
                    f" data.split={split!r}: the {name} split gets none; add documents or"
                    f" change data.split (e.g. '{'100,0,0' if name != 'train' else '98,2,0'}')"
                )
    return split

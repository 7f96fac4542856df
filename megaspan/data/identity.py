"""What a run trains on, as recorded in every checkpoint: each prefix, its sizes, a content hash
of its ``.idx``, and the blend (weights, split).

Two uses:

* a resume compares the checkpoint's record with the data it is given now, and refuses a
  difference in one line (:func:`describe_difference`) unless ``checkpoint.allow_data_change``;
* Megatron's index cache (document/sample/shuffle ``.npy`` files) is named after the dataset
  *path*, not its content: data replaced under the same prefix would be read through the old
  indices. :func:`cache_key` names a cache subdirectory after the content, so new data gets a new
  index (built, never trusted from the old one).

The ``.idx`` holds every document's length and offset, so its hash changes whenever the
document boundaries do (which is all the index cache depends on); the ``.bin`` is covered by its
size only (hashing terabytes at every start is not affordable).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CHUNK = 4 << 20
# (path, size, mtime_ns) -> sha256: a run computes the identity twice (index cache, checkpoint).
_HASHES: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _HASHES[memo] = digest.hexdigest()
    return _HASHES[memo]


def prefix_identity(prefix: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"prefix", "bin_bytes", "idx_bytes", "idx_sha256"}`` of one indexed dataset."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    return {
        "prefix": str(prefix),
        "bin_bytes": bin_path.stat().st_size,
        "idx_bytes": idx_path.stat().st_size,
        "idx_sha256": _sha256(idx_path),
    }


def data_identity(
    prefixes: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None, split: str | None
) -> dict[str, Any]:
    """The record of a run's data: every prefix's identity and the blend (``weights``: the
    configured blend weights, None = by size; ``split``: ``data.split``, None when not used)."""
    return {
        "datasets": [prefix_identity(p) for p in prefixes],
        "weights": None if weights is None else [float(w) for w in weights],
        "split": split,
    }


def cache_key(identity: dict[str, Any]) -> str:
    """A short name for the content of ``identity``'s datasets (prefix, sizes, ``.idx`` hash)."""
    text = json.dumps(identity["datasets"], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two :func:`data_identity` records, in a few words, or None."""
    old = {d["prefix"]: d for d in saved.get("datasets", [])}
    new = {d["prefix"]: d for d in now.get("datasets", [])}
    if list(old) != list(new):
        return f"data.paths were {list(old)}, now {list(new)}"
    for prefix, before in old.items():
        after = new[prefix]
        for key, what in (
            ("bin_bytes", ".bin size"),
            ("idx_bytes", ".idx size"),
            ("idx_sha256", ".idx content"),
        ):
            if before.get(key) != after.get(key):
                if key == "idx_sha256":
                    change = f"hash {str(before.get(key))[:12]} -> {str(after.get(key))[:12]}"
                else:
                    change = f"{before.get(key)} -> {after.get(key)} bytes"
                return f"{prefix}: {what} changed ({change}): the data was replaced under the same prefix"
    if saved.get("weights") != now.get("weights"):
        return f"data.weights were {saved.get('weights')}, now {now.get('weights')}"
    if saved.get("split") != now.get("split"):
        return f"data.split was {saved.get('split')!r}, now {now.get('split')!r}"
    return None

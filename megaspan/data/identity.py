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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CHUNK = 4 << 20
_MEMO_FILE = "idx_sha256.json"


def _file_key(path: Path) -> str:
    """What identifies one version of a file without reading it: replacing or rewriting it
    changes its inode or ctime (which no user tool can set back), so a hash stored under this
    key is never reused for other content."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def _sha256(path: Path, memo: dict[str, str]) -> str:
    key = _file_key(path)
    if key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        memo[key] = digest.hexdigest()
    return memo[key]


def _load_memo(memo_dir: Path | None) -> dict[str, str]:
    try:
        memo = json.loads((memo_dir / _MEMO_FILE).read_text()) if memo_dir else {}
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _store_memo(memo_dir: Path | None, memo: dict[str, str]) -> None:
    """Best effort (a cache): an atomic replace, so concurrent jobs never read half a file."""
    if memo_dir is None:
        return
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo_dir / f".{_MEMO_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_dir / _MEMO_FILE)
    except OSError:
        pass


def prefix_identity(prefix: str | os.PathLike[str], memo: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"prefix", "bin_bytes", "idx_bytes", "idx_sha256"}`` of one indexed dataset."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    return {
        "prefix": str(prefix),
        "bin_bytes": bin_path.stat().st_size,
        "idx_bytes": idx_path.stat().st_size,
        "idx_sha256": _sha256(idx_path, {} if memo is None else memo),
    }


def data_identity(
    prefixes: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | None,
    split: str | None,
    memo_dir: Path | None = None,
) -> dict[str, Any]:
    """The record of a run's data: every prefix's identity and the blend (``weights``: the
    configured blend weights, None = by size; ``split``: ``data.split``, None when not used).

    An ``.idx`` of a large corpus is gigabytes: it is hashed by global rank 0 only (the others
    get the record by broadcast, so call this on every rank when a process group exists), and
    once per file version: the hashes are kept in ``memo_dir`` (the index cache) under a key
    that changes whenever the file is replaced or rewritten (see ``_file_key``)."""

    def compute() -> dict[str, Any]:
        memo = _load_memo(memo_dir)
        known = dict(memo)
        record = {
            "datasets": [prefix_identity(p, memo) for p in prefixes],
            "weights": None if weights is None else [float(w) for w in weights],
            "split": split,
        }
        if memo != known:
            _store_memo(memo_dir, memo)
        return record

    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [compute()]
        except OSError as exc:  # every rank raises it, none is left in the broadcast
            box = [exc]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], OSError):
        raise box[0]
    return box[0]


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

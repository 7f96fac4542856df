"""Read an offline W&B run's ``run-<id>.wandb`` file (wandb >= 0.2x has no Python reader left).

The format is wandb's transaction log, as its former ``wandb/sdk/internal/datastore.py`` documents
it: a 7-byte file header (``:W&B``, magic 0xBEE1 little-endian, version 0), then LevelDB-log
records in 32 KiB blocks; each record is a 7-byte header (CRC-32C, little-endian length, type
FULL=1/FIRST=2/MIDDLE=3/LAST=4) and its data; a block whose tail cannot hold a header is
zero-padded. The records' data are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        space = _BLOCK - pos % _BLOCK
        if space < _HEADER:  # zero padding at the end of a block
            pos += space
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            pending = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def run_ids(path: Path) -> set[str]:
    return {r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run"}


def history(path: Path, key: str) -> dict[int, float]:
    """{step: value} of one logged scalar."""
    found = {}
    for r in records(path):
        if r.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item}
        if key in items:
            found[int(r.history.step.num)] = float(json.loads(items[key]))
    return found


def config(path: Path) -> dict:
    """The run's config as logged (last value of each key)."""
    found = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for item in (r.run.config if kind == "run" else r.config).update:
                found[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return found

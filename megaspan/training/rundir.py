"""The run directory: a lock against a second live run, start-up writes that fail in one line,
and the resolved ``config.yaml``.

The lock is an ``fcntl.flock`` on ``<run_dir>/.lock`` held by rank 0 for the life of the run. The
kernel drops it when the process dies, however it dies, so a stale lock of a killed run is taken
over without any pid guessing; the pid written into the file only names the holder in the error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from megaspan.errors import RunDirError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"

# Filesystem refusals that are the user's to fix (space, permissions, a file where a dir should be).
FS_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EDQUOT}
)

_FIX = {
    errno.ENOSPC: "free some space or choose another training.run_dir",
    errno.EDQUOT: "free some space or choose another training.run_dir",
    errno.EROFS: "the filesystem is read-only: choose a writable training.run_dir",
    errno.EACCES: "no permission: fix the permissions or choose another training.run_dir",
    errno.EPERM: "no permission: fix the permissions or choose another training.run_dir",
    errno.ENOTDIR: "a path component is a file, not a directory: choose another training.run_dir",
    errno.EEXIST: "a file is in the way of a directory: remove it or choose another training.run_dir",
}


def fs_error(exc: OSError, path: Path | str) -> RunDirError:
    """One line naming the path, what the filesystem said and what to do."""
    where = exc.filename or path
    return RunDirError(
        f"cannot write {where}: {os.strerror(exc.errno)}; {_FIX.get(exc.errno, 'check the path')}"
    )


def guarded[T](path: Path | str, action: Callable[[], T]) -> T:
    """Run ``action``; a user-fixable filesystem error becomes :class:`RunDirError`."""
    try:
        return action()
    except OSError as exc:
        if exc.errno in FS_ERRNOS:
            raise fs_error(exc, path) from None
        raise


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a prefix (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunDirLock:
    """Exclusive use of a run directory by one live run (take it on rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = guarded(self.path, lambda: os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another live run (pid {holder}); wait for it to end, "
                "stop it, or choose another training.run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def write_resolved_config(run_dir: Path, config: dict[str, Any], resolved: dict[str, Any]) -> None:
    """``config.yaml``: the config with every ``auto``/``null`` the run resolved filled in (it
    round-trips through ``load_config``), headed by what the run was made of (tokenizer hash,
    layout, versions) as comments."""
    header = ["# megaspan run: resolved at start-up (rewritten at each start, after its checks pass)"]
    header += [f"# {key}: {json.dumps(value)}" for key, value in resolved.items()]
    text = "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False)
    guarded(run_dir / CONFIG_FILE, lambda: write_atomic(run_dir / CONFIG_FILE, text))


SUMMARY_FILE = "summary.json"  # written by megaspan.training.callbacks.summary


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def completed_run(run_dir: Path, config: dict[str, Any]) -> tuple[int, list[str]] | None:
    """For a run dir whose ``summary.json`` says *completed* at or beyond ``training.steps`` of
    ``config`` (a ``config_to_dict``): ``(its step, the settings that differ)``; else None.

    Re-running a finished run used to train zero steps and then rewrite its summary (final loss
    null, tokens/s 0) and its config.yaml. Values left to be resolved at start-up (``null``,
    ``auto``) count as the same: the finished run resolved them on its own start.
    """
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        return None
    step = summary.get("steps")
    if not isinstance(step, int) or step < config["training"]["steps"]:
        return None  # more steps asked for: the run goes on from its checkpoint
    before = _flat(summary.get("config") or {})
    now = _flat(config)
    differ = [
        f"{key} {before.get(key)!r} -> {value!r}"
        for key, value in now.items()
        if value not in (None, "auto") and key != "training.steps" and key in before and before[key] != value
    ]
    return step, differ

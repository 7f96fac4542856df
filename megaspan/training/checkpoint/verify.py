"""Is a checkpoint complete and intact, and which one a resume takes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megaspan.errors import CheckpointError
from megaspan.training.checkpoint.layout import (
    _PREFIX,
    LATEST_FILE,
    META_FILE,
    _crc32,
    _step_of,
    _warn,
    lineage_of,
    read_latest,
    read_meta,
)


def check_checkpoint(path: Path, verify: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is.

    Cheap by default: the name, the commit record, and every file of its manifest present with
    its recorded size (this catches missing and truncated files). ``verify=True`` also compares
    the CRC-32 of every file (garbage written over a file at the same size); it reads the whole
    checkpoint once. Checkpoints from before manifests existed pass the cheap checks only.
    Not collective: each caller reads the files it checks.
    """
    step = _step_of(path)
    if step is None:
        return f"{path.name} is not a checkpoint directory name (step_NNNNNNN)"
    if not path.is_dir():
        return f"{path} does not exist"
    meta = read_meta(path)
    if meta is None:
        return f"{path / META_FILE} is missing or unreadable (an interrupted save)"
    if meta.get("step") != step:
        return f"{path / META_FILE} records step {meta.get('step')}, not {step}"
    if not (path / "metadata.json").is_file():
        return f"{path / 'metadata.json'} is missing"
    for name, entry in (meta.get("manifest") or {}).items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{file} is missing"
        if size != entry["size"]:
            return f"{file} has {size} bytes, the commit recorded {entry['size']} (truncated or overwritten)"
        if verify and _crc32(file) != entry["crc32"]:
            return f"{file} is corrupt (checksum differs from the one recorded at save)"
    return None


def is_valid(path: Path, verify: bool = False) -> bool:
    """Complete = named ``step_N``, commit record for step N, its files as recorded (see
    :func:`check_checkpoint`; ``verify=True`` also compares checksums)."""
    return check_checkpoint(path, verify) is None


def find_latest_valid(
    ckpt_dir: Path,
    verify: bool = False,
    warn: Callable[[str], None] | None = None,
    *,
    require_intact: bool = False,
) -> Path | None:
    """The newest intact checkpoint of the run in ``ckpt_dir``, or None.

    ``latest`` is trusted only as a hint. Checkpoints of its lineage that are *newer* than the
    one it names are real work (a crash between the commit's rename and the ``latest`` update, or
    a ``latest`` restored from an old backup): the newest of them that passes full verification
    (checksums, whatever ``verify`` says) is chosen, with a warning. A ``latest`` holding garbage
    is ignored the same way (the newest intact ``step_*`` wins). Checkpoints skipped because they
    fail :func:`check_checkpoint` are named in ONE warning line (``warn``, default: ``megaspan:
    warning: ...`` on stderr from rank 0). ``verify=True`` checks checksums for every candidate
    (for ``checkpoint.resume=auto``: the chosen checkpoint is then read once more, which also
    warms the page cache for the load).

    ``require_intact=True`` (``checkpoint.resume=auto``): when checkpoints exist and none is
    intact, raise a :class:`~megaspan.errors.CheckpointError` naming them instead of returning
    None: a run whose storage went bad must not silently start over. Not collective: every rank
    reaches the same answer.
    """
    warn = warn or _warn
    candidates = sorted(
        (p for p in ckpt_dir.glob(f"{_PREFIX}*") if _step_of(p) is not None), key=_step_of, reverse=True
    )
    name, latest_problem = read_latest(ckpt_dir)
    notes = [f"{latest_problem}: ignoring it"] if latest_problem else []
    newer: list[Path] = []
    if name is not None:
        pointed = ckpt_dir / name
        lineage = lineage_of(pointed)
        # Newer checkpoints of another lineage (another run started over in this directory) are
        # not this run's work; with the pointed one unreadable its lineage is unknown: all count.
        newer = [
            p
            for p in candidates
            if _step_of(p) > _step_of(pointed) and (lineage is None or lineage_of(p) == lineage)
        ]
        candidates = newer + [pointed] + [p for p in candidates if _step_of(p) < _step_of(pointed)]
    skipped: list[str] = []
    for path in candidates:
        problem = check_checkpoint(path, verify or path in newer)
        if problem is None:
            if path in newer:
                notes.append(
                    f"{ckpt_dir / LATEST_FILE} names {name}, but {path.name} is newer and passes full "
                    "verification"
                )
            if skipped:
                notes.append(f"skipping corrupt checkpoint(s): {'; '.join(skipped)}")
            if notes:
                warn(f"{'; '.join(notes)}; resuming from {path}")
            return path
        if path.exists():
            skipped.append(problem)
    if skipped and require_intact:
        raise CheckpointError(
            f"no intact checkpoint in {ckpt_dir} ({'; '.join(skipped)}); not starting over on top of "
            "them: restore them from a copy, point checkpoint.resume at an intact checkpoint, or start "
            "over in this run dir with checkpoint.resume=none (the damaged ones are kept; a new run "
            "never prunes or overwrites another run's checkpoints)"
        )
    if skipped:
        warn(f"no intact checkpoint in {ckpt_dir} ({'; '.join(skipped)}): starting from scratch")
    elif notes:
        warn("; ".join(notes))
    return None

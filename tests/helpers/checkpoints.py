"""Checkpoint test helpers: a real tiny model with its optimizer and scheduler, a save of it,
and the one-line check of a user-facing error."""

from __future__ import annotations

from pathlib import Path

from megaspan.training.checkpoint import Progress, save_checkpoint
from tests.helpers.models import tiny_overrides

VOCAB = 128


def objs(*extra: str):
    from megaspan.config.loader import load_config
    from megaspan.training.setup import build_training_objects

    return build_training_objects(load_config(None, tiny_overrides(extra=extra)), VOCAB)


def save(objs, ckpt_dir: Path, step: int, keep_last: int | None = None, **kw) -> Path:
    return save_checkpoint(
        ckpt_dir, Progress(step, step * 4), objs.chunks, objs.optimizer, objs.scheduler, {}, keep_last, **kw
    )


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 600, text
    return text

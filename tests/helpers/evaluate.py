"""Tiny checkpoints for the judging tests (generate, eval, export), saved in-process through
megaspan's own checkpoint code with the config and tokenizer hash a real run records."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.models import tiny_overrides


def save_tiny(
    ckpt_dir: Path,
    tokenizer,
    placement: str = "spannorm",
    moe: bool = False,
    *,
    arch: str = "gpt",
    seq_length: int = 32,
    extra: tuple[str, ...] = (),
):
    """Build a tiny model (random init, placement init rules applied), save it as ``step_0000000``
    under ``ckpt_dir``; returns (its model chunk in eval mode, the checkpoint path, the config)."""
    from megaspan.config.loader import config_to_dict, load_config
    from megaspan.data.tokenizer import tokenizer_hash
    from megaspan.training.checkpoint import Progress, save_checkpoint
    from megaspan.training.setup import build_training_objects

    overrides = tiny_overrides(
        placement,
        moe,
        seq_length=seq_length,
        extra=(f"tokenizer.model={tokenizer.path}", f"model.arch={arch}", *extra),
    )
    cfg = load_config(None, overrides)
    objs = build_training_objects(cfg, tokenizer.vocab_size)
    path = save_checkpoint(
        ckpt_dir,
        Progress(0, 0),
        objs.chunks,
        objs.optimizer,
        objs.scheduler,
        config_to_dict(cfg),
        None,
        tokenizer_hash=tokenizer_hash(tokenizer.path),
    )
    chunk = objs.chunks[0]
    chunk.eval()
    return chunk, path, cfg

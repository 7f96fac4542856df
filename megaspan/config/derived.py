"""Sizes derived from the config by pure arithmetic (no torch): shared by validate, plan and models."""

from __future__ import annotations

from megaspan.config.schema import MegaspanConfig, ModelConfig

FFN_MULTIPLE = 128
"""The derived SwiGLU FFN size is a multiple of this: 16 (TE's FP8 alignment) x 8 (the largest
TP of one 8-GPU node)."""


def ffn_hidden_size(model: ModelConfig) -> int:
    """The dense MLP's hidden size: ``model.ffn_hidden_size`` or the activation's convention."""
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.activation == "swiglu":
        # LLaMA convention: 8/3 h keeps SwiGLU's parameter count at the 4h GeLU MLP's. Rounded
        # up to a multiple of FFN_MULTIPLE so that FFN / TP stays a multiple of 16, the FP8 GEMM
        # rule (megaspan.config.fp8), for every power-of-two TP up to 8.
        return FFN_MULTIPLE * -(-8 * model.hidden_size // (3 * FFN_MULTIPLE))
    return 4 * model.hidden_size


def decay_steps(cfg: MegaspanConfig) -> int:
    """Steps of the LR decay: ``schedule.decay_steps`` or the whole run."""
    return cfg.schedule.decay_steps or cfg.training.steps


def deterministic(cfg: MegaspanConfig, cuda: bool) -> bool:
    """``training.deterministic`` resolved: None = on for CPU runs (bitwise-repeatable, as the
    tests need), off on GPU (deterministic algorithms cost throughput there)."""
    if cfg.training.deterministic is not None:
        return cfg.training.deterministic
    return not cuda

"""Sizes derived from the config by pure arithmetic (no torch): shared by validate, plan and models."""

from __future__ import annotations

from megaspan.config.schema import MegaspanConfig, ModelConfig


def ffn_hidden_size(model: ModelConfig) -> int:
    """The dense MLP's hidden size: ``model.ffn_hidden_size`` or the activation's convention."""
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.activation == "swiglu":
        # LLaMA convention: 8/3 h keeps SwiGLU's parameter count at the 4h GeLU MLP's.
        return 64 * ((8 * model.hidden_size // 3 + 63) // 64)
    return 4 * model.hidden_size


def decay_steps(cfg: MegaspanConfig) -> int:
    """Steps of the LR decay: ``schedule.decay_steps`` or the whole run."""
    return cfg.schedule.decay_steps or cfg.training.steps

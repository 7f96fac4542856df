"""The model wing: config -> Megatron-Core ``TransformerConfig``, layer specs, backend detection
and ``build_model``. Everything here needs torch and Megatron-Core; the code lives in the
submodules (``build``, ``mcore_config``, ``specs``, ``backend``), this file only re-exports."""

from __future__ import annotations

from megaspan.models.backend import allow_fp8_extra_state, detect_capabilities, resolve_impl, te_available
from megaspan.models.build import BuiltModel, apply_init_rules, build_model, placement_for
from megaspan.models.mcore_config import (
    model_vocab_size,
    padded_vocab_size,
    resolve_dtype,
    transformer_config,
)
from megaspan.models.specs import block_spec

__all__ = [
    "BuiltModel",
    "allow_fp8_extra_state",
    "apply_init_rules",
    "block_spec",
    "build_model",
    "detect_capabilities",
    "model_vocab_size",
    "padded_vocab_size",
    "placement_for",
    "resolve_dtype",
    "resolve_impl",
    "te_available",
    "transformer_config",
]

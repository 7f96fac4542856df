"""The one table of norm slots: which norms a layer can own, and where each one sits.

Everything that enumerates norm slots reads :data:`SLOTS`: the per-layer :class:`LayerPlan`
flags, the extra fields of ``NormPlacementSubmodules`` and their construction in
:mod:`megaspan.norms.layer`, CUDA-graph membership, and the spec mapping in
:mod:`megaspan.models.specs` (including TE's fused norm+linear keys). Adding a slot = one row here
plus the placement that uses it in its residual equations.

Torch-free: the placement registry (and so config validation) imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Literal


@dataclass(frozen=True)
class NormSlot:
    flag: str
    """The :class:`LayerPlan` field that switches the slot on."""
    module: str
    """The layer attribute (and checkpoint key prefix) holding the norm."""
    sublayer: Literal["attention", "mlp"]
    """The sublayer the norm belongs to (its CUDA-graph scope)."""
    doc: str
    megatron: bool = False
    """A slot of Megatron's own ``TransformerLayer`` (built by it); others are added by megaspan."""
    fused_key: str | None = None
    """Megatron slots only: where TE keeps the norm when it fuses it into the next linear
    (``TELayerNormColumnParallelLinear``); the local spec maps its keys there so checkpoints are
    interchangeable between backends."""


SLOTS: tuple[NormSlot, ...] = (
    NormSlot(
        "input_norm",
        "input_layernorm",
        "attention",
        megatron=True,
        fused_key="self_attention.linear_qkv.layer_norm_",
        doc="Norm on the attention input only (Pre-LN's N1; SpanNorm's block-0 N0). Residual stays x.",
    ),
    NormSlot(
        "pre_mlp_norm",
        "pre_mlp_layernorm",
        "mlp",
        megatron=True,
        fused_key="mlp.linear_fc1.layer_norm_",
        doc="Norm on the MLP input (Pre-LN's N2).",
    ),
    NormSlot(
        "post_attn_norm",
        "post_attn_norm",
        "attention",
        doc="Norm applied to the attention residual sum (Post-LN's N1).",
    ),
    NormSlot(
        "post_mlp_norm", "post_mlp_norm", "mlp", doc="Norm applied to the MLP residual sum (Post-LN's N2)."
    ),
    NormSlot(
        "attn_out_norm",
        "attn_out_norm",
        "attention",
        doc="Norm on the attention output before the add (Peri-LN).",
    ),
    NormSlot("mlp_out_norm", "mlp_out_norm", "mlp", doc="Norm on the MLP output before the add (Peri-LN)."),
)

EXTRA_SLOTS: tuple[NormSlot, ...] = tuple(s for s in SLOTS if not s.megatron)
"""The slots megaspan adds to Megatron's layer (fields of ``NormPlacementSubmodules``)."""

_MODIFIERS: tuple[tuple[str, type, object, str], ...] = (
    (
        "mlp_residual_normed",
        bool,
        False,
        "The MLP residual is the *normed* input N2(y) instead of y (HybridNorm).",
    ),
    ("qkv_norm", bool, False, "Per-head norms on Q, K and V (HybridNorm)."),
    (
        "norm_scale",
        float,
        1.0,
        "Constant multiplier on the outputs of input_norm and pre_mlp_norm (LayerNorm Scaling).",
    ),
)

LayerPlan = make_dataclass(
    "LayerPlan",
    [(s.flag, bool, field(default=False, metadata={"doc": s.doc})) for s in SLOTS]
    + [(name, tp, field(default=default, metadata={"doc": doc})) for name, tp, default, doc in _MODIFIERS],
    frozen=True,
    kw_only=True,
    module=__name__,
)
LayerPlan.__doc__ = (
    "Which norms one layer has (one bool per row of SLOTS) and how they are used. "
    "Unused slots are ``IdentityOp`` and own no parameters."
)

"""The placement interface, the per-layer plan, and the weight-selection helpers for init rules.

A placement (one file each in this folder) says three things:

* :meth:`Placement.plan` - which norm slots layer ``l`` (global, 1-based) has;
* :meth:`Placement.attn_residual` / :meth:`Placement.mlp_residual` - how a sublayer output is
  combined with the residual stream (the block equations), given Megatron's fused
  bias-dropout-add ``bda((out, bias), residual, p) = residual + dropout(out + bias)``;
* :meth:`Placement.init_weights` - init rules applied after Megatron's init.

Everything else (building modules, TP/SP/EP/PP, recompute, checkpoints) is shared by
:class:`megaspan.norms.layer.NormPlacementTransformerLayer`. Shapes follow Megatron: ``[s, b, h]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

import torch

if TYPE_CHECKING:  # pragma: no cover
    from megaspan.config.schema import NormOptions

Tensor = torch.Tensor
BDA = Callable[[tuple, Tensor, float], Tensor]


@dataclass(frozen=True)
class LayerPlan:
    """Which norms one layer has. Unused slots are ``IdentityOp`` and own no parameters."""

    input_norm: bool = False
    """Norm on the attention input only (Pre-LN's N1; SpanNorm's block-0 N0). Residual stays x."""
    pre_mlp_norm: bool = False
    """Norm on the MLP input (Pre-LN's N2)."""
    post_attn_norm: bool = False
    """Norm applied to the attention residual sum (Post-LN's N1)."""
    post_mlp_norm: bool = False
    """Norm applied to the MLP residual sum (Post-LN's N2)."""
    attn_out_norm: bool = False
    """Norm on the attention output before the add (Peri-LN)."""
    mlp_out_norm: bool = False
    """Norm on the MLP output before the add (Peri-LN)."""
    mlp_residual_normed: bool = False
    """The MLP residual is the *normed* input N2(y) instead of y (HybridNorm)."""
    qkv_norm: bool = False
    """Per-head norms on Q, K and V (HybridNorm)."""
    norm_scale: float = 1.0
    """Constant multiplier on the outputs of input_norm and pre_mlp_norm (LayerNorm Scaling)."""


class Placement:
    """Base class: Pre-LN residual arithmetic; subclasses override what differs."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_final_norm: ClassVar[bool] = True
    scaled_init: ClassVar[bool] = True
    """Use Megatron's sigma/sqrt(2L) on the output projections (linear_proj, linear_fc2)."""
    qkv_norm: ClassVar[bool] = False
    """Needs per-head QK(V) norms, i.e. TransformerConfig.qk_layernorm=True."""
    block_spanning: ClassVar[bool] = False
    """Reads the block input inside the MLP residual (unsafe with partial CUDA graphs)."""

    def __init__(self, options: "NormOptions", num_layers: int):
        self.options = options
        self.num_layers = num_layers

    # --- structure -------------------------------------------------------------------------
    def plan(self, layer_number: int) -> LayerPlan:
        """Norm slots of the layer with global 1-based ``layer_number``."""
        raise NotImplementedError

    @property
    def final_norm(self) -> bool:
        if self.options.final_norm is not None:
            return self.options.final_norm
        return self.default_final_norm

    def init_std(self, hidden_size: int, requested: float | None) -> float:
        return 0.02 if requested is None else requested

    @property
    def layer_dependent_slots(self) -> bool:
        """Do layers differ in which norm modules (parameters) they own?"""
        slots = {dataclasses.replace(self.plan(l), norm_scale=1.0) for l in range(1, self.num_layers + 1)}
        return len(slots) > 1

    # --- equations ---------------------------------------------------------------------------
    def attn_residual(self, layer, bda: BDA, out_with_bias: tuple, residual: Tensor, p: float) -> Tensor:
        return bda(out_with_bias, residual, p)

    def mlp_residual(self, layer, bda: BDA, out_with_bias: tuple, residual: Tensor, p: float) -> Tensor:
        return bda(out_with_bias, residual, p)

    # --- init rules --------------------------------------------------------------------------
    def init_weights(self, layer) -> None:
        """Rescale ``layer``'s weights after Megatron's init (default: nothing)."""


# ---------------------------------------------------------------------------------------------
# Weight selection for init rules. Names cover the local backend, TE (fused LN-linear, whose
# norm gain is ``layer_norm_weight`` and must never be rescaled) and MoE experts (SequentialMLP
# ``local_experts.N.linear_fc*``, TEGroupedMLP ``linear_fc*.weightN``, GroupedMLP ``weight1/2``).
# ---------------------------------------------------------------------------------------------
_KIND_PATTERNS = {
    "qkv": re.compile(r"self_attention\.linear_qkv\.weight$"),
    "proj": re.compile(r"self_attention\.linear_proj\.weight$"),
    "fc1": re.compile(r"mlp\..*(linear_fc1\.weight\d*|weight1)$"),
    "fc2": re.compile(r"mlp\..*(linear_fc2\.weight\d*|weight2)$"),
}


def block_weights(layer, kind: str) -> Iterator[torch.nn.Parameter]:
    """Parameters of ``layer`` of one kind: 'qkv', 'proj', 'fc1' or 'fc2' (dense, shared or experts)."""
    pattern = _KIND_PATTERNS[kind]
    for name, param in layer.named_parameters():
        if pattern.search(name):
            yield param


@torch.no_grad()
def scale_weights(layer, kinds: tuple[str, ...], factor: float) -> None:
    for kind in kinds:
        for param in block_weights(layer, kind):
            param.mul_(factor)


def qkv_value_rows(layer) -> tuple[int, int, int]:
    """(groups on this rank, rows per group, head dim) of the fused QKV weight.

    Megatron interleaves the fused QKV output per query group: each group holds its
    ``np/ng`` query heads, then one key head, then one value head, each ``hn`` rows; TP splits
    whole groups across ranks, so the local shard has the same structure.
    """
    attn = layer.self_attention
    groups = attn.num_query_groups_per_partition
    hn = attn.hidden_size_per_attention_head
    per_group = (attn.num_attention_heads_per_partition // groups + 2) * hn
    return groups, per_group, hn


@torch.no_grad()
def scale_value_rows(layer, factor: float) -> None:
    """Multiply only the V rows of the fused QKV weight by ``factor``."""
    groups, per_group, hn = qkv_value_rows(layer)
    for param in block_weights(layer, "qkv"):
        view = param.view(groups, per_group, -1)
        view[:, per_group - hn :, :].mul_(factor)


def inv_sqrt(x: float) -> float:
    return 1.0 / math.sqrt(x)

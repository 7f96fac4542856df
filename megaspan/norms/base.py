"""The placement interface and its options base class.

A placement (one file each in :mod:`megaspan.norms.placements`) says four things:

* :attr:`Placement.Options` - its knobs (``model.norm.*``), a dataclass extending
  :class:`PlacementOptions`;
* :meth:`Placement.plan` - which norm slots layer ``l`` (global, 1-based) has;
* :meth:`Placement.attn_residual` / :meth:`Placement.mlp_residual` - how a sublayer output is
  combined with the residual stream (the block equations), given Megatron's fused
  bias-dropout-add ``bda((out, bias), residual, p) = residual + dropout(out + bias)``;
* :meth:`Placement.init_weights` - init rules applied after Megatron's init
  (helpers in :mod:`megaspan.norms.weights`).

Everything else (building modules, TP/SP/EP/PP, recompute, checkpoints) is shared by
:class:`megaspan.norms.layer.NormPlacementTransformerLayer`. Shapes follow Megatron: ``[s, b, h]``.

This module and the placement files import no torch: the registry (names, descriptions and
options) is read by config validation, which must stay fast and torch-free. Tensors only arrive
as arguments at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from megaspan.norms.slots import LayerPlan

BDA = Callable[[tuple, Any, float], Any]


@dataclass(kw_only=True)
class PlacementOptions:
    """Options every placement has. A placement with knobs of its own subclasses this."""

    final_norm: Optional[bool] = None
    """Final norm before the LM head; None = the placement's default."""


class Placement:
    """Base class: Pre-LN residual arithmetic; subclasses override what differs."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[PlacementOptions]] = PlacementOptions
    """The dataclass of this placement's ``model.norm.*`` options."""
    default_final_norm: ClassVar[bool] = True
    scaled_init: ClassVar[bool] = True
    """Use Megatron's sigma/sqrt(2L) on the output projections (linear_proj, linear_fc2)."""
    qkv_norm: ClassVar[bool] = False
    """Needs per-head QK(V) norms, i.e. TransformerConfig.qk_layernorm=True."""
    block_spanning: ClassVar[bool] = False
    """Reads the block input inside the MLP residual (unsafe with partial CUDA graphs)."""

    def __init__(self, options: PlacementOptions | None, num_layers: int):
        self.options = self.Options() if options is None else options
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
        """Do layers differ in which norm modules (parameters) they own?

        ``norm_scale`` is left out: whether it is 1 or not never changes a layer's parameters or
        checkpoint keys, because the TE fusion decision that depends on it is taken once for the
        whole placement (:attr:`scales_pre_norms`)."""
        slots = {dataclasses.replace(self.plan(n), norm_scale=1.0) for n in range(1, self.num_layers + 1)}
        return len(slots) > 1

    @property
    def scales_pre_norms(self) -> bool:
        """Does any layer rescale its pre-norm outputs (``norm_scale != 1``)?

        TE's fused norm+linear cannot scale the norm output, so such a placement keeps its
        pre-norms unfused in *every* layer, including those whose scale happens to be 1 (LNS's
        block 1): a per-layer decision would give layers different checkpoint keys while
        :attr:`layer_dependent_slots` says they stack on one layer axis."""
        return any(self.plan(n).norm_scale != 1.0 for n in range(1, self.num_layers + 1))

    # --- equations ---------------------------------------------------------------------------
    def attn_residual(self, layer, bda: BDA, out_with_bias: tuple, residual, p: float):
        return bda(out_with_bias, residual, p)

    def mlp_residual(self, layer, bda: BDA, out_with_bias: tuple, residual, p: float):
        return bda(out_with_bias, residual, p)

    # --- init rules --------------------------------------------------------------------------
    def init_weights(self, layer) -> None:
        """Rescale ``layer``'s weights after Megatron's init (default: nothing)."""


def inv_sqrt(x: float) -> float:
    return 1.0 / math.sqrt(x)


__all__ = ["BDA", "LayerPlan", "Placement", "PlacementOptions", "inv_sqrt"]

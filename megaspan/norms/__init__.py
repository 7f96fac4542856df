"""Normalization placements: a registry of one class per placement, selected by name.

Adding a placement = one new module in :mod:`megaspan.norms.placements` with a ``@register``-ed
:class:`Placement` subclass (and its ``Options`` dataclass if it has knobs), plus its reference
equations in tests/unit/reference.py. Adding a norm slot = one row in :mod:`megaspan.norms.slots`.

This package's top level is torch-free (see :mod:`megaspan.norms.registry`); the Megatron layer
lives in :mod:`megaspan.norms.layer`.
"""

from __future__ import annotations

from megaspan.norms.base import Placement, PlacementOptions
from megaspan.norms.registry import (
    UnknownPlacementError,
    available,
    build_placement,
    get_placement_class,
    register,
)
from megaspan.norms.slots import SLOTS, LayerPlan, NormSlot

__all__ = [
    "SLOTS",
    "LayerPlan",
    "NormSlot",
    "Placement",
    "PlacementOptions",
    "UnknownPlacementError",
    "available",
    "build_placement",
    "get_placement_class",
    "register",
]

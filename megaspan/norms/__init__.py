"""Normalization placements: a registry of one class per placement, selected by name.

Adding a placement = one new module here with a :class:`Placement` subclass, listed in
``_MODULES`` below, plus its reference equations in tests/unit/reference.py.
"""

from __future__ import annotations

import importlib

from megaspan.errors import ConfigError
from megaspan.norms.base import LayerPlan, Placement

_MODULES = (
    "pre",
    "post",
    "spannorm",
    "b2t",
    "hybridnorm",
    "deepnorm",
    "mixln",
    "peri",
    "lns",
)

_REGISTRY: dict[str, type[Placement]] = {}


def register(cls: type[Placement]) -> type[Placement]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"placement '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    if _REGISTRY:
        return
    for mod in _MODULES:
        module = importlib.import_module(f"megaspan.norms.{mod}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Placement) and obj.__module__ == module.__name__:
                register(obj)


class UnknownPlacementError(ConfigError):
    pass


def available() -> dict[str, type[Placement]]:
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_placement_class(name: str) -> type[Placement]:
    registry = available()
    if name not in registry:
        raise UnknownPlacementError(
            f"unknown norm placement '{name}': set model.norm_placement to one of {', '.join(registry)}"
        )
    return registry[name]


def build_placement(name: str, options, num_layers: int) -> Placement:
    return get_placement_class(name)(options, num_layers)


__all__ = [
    "LayerPlan",
    "Placement",
    "UnknownPlacementError",
    "available",
    "build_placement",
    "get_placement_class",
    "register",
]

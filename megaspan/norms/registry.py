"""The placement registry: one registration path, torch-free.

A placement is a :class:`~megaspan.norms.base.Placement` subclass decorated with
:func:`register` in a module of :mod:`megaspan.norms.placements`. :func:`available` imports every
module of that folder once (``pkgutil``; about a millisecond each, no torch), so adding a
placement is adding a file there - there is no list to keep in sync. Tests and ``megaspan info``
iterate over :func:`available`.

Why torch-free: ``megaspan.config`` resolves ``model.norm.*`` against the selected placement's
``Options`` dataclass while loading a config and validates the placement name; both must work in
a process that has not imported torch (``megaspan --help``, ``megaspan plan`` argument errors,
Slurm submit hosts). Config reaches this registry only through
:func:`megaspan.config.loader.norm_options` at call time, never at import time, so
``import megaspan.config`` loads nothing from here. The heavy half of the package (``layer``,
``modules``: Megatron modules) is only imported by :mod:`megaspan.models`.
"""

from __future__ import annotations

import importlib
import pkgutil

from megaspan.errors import ConfigError
from megaspan.norms.base import Placement, PlacementOptions

_REGISTRY: dict[str, type[Placement]] = {}
_loaded = False


class UnknownPlacementError(ConfigError):
    pass


def register(cls: type[Placement]) -> type[Placement]:
    """Class decorator: make ``cls`` selectable as ``model.norm_placement=<cls.name>``."""
    if not (isinstance(cls, type) and issubclass(cls, Placement)) or "name" not in vars(cls):
        raise TypeError(f"@register needs a Placement subclass with its own `name`, got {cls!r}")
    if not issubclass(cls.Options, PlacementOptions):
        raise TypeError(f"{cls.__name__}.Options must extend PlacementOptions")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"placement '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    from megaspan.norms import placements

    for info in pkgutil.iter_modules(placements.__path__):
        importlib.import_module(f"{placements.__name__}.{info.name}")
    _loaded = True


def available() -> dict[str, type[Placement]]:
    """Every registered placement by name (sorted)."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_placement_class(name: str) -> type[Placement]:
    registry = available()
    if name not in registry:
        raise UnknownPlacementError(
            f"unknown norm placement '{name}': set model.norm_placement to one of {', '.join(registry)}"
        )
    return registry[name]


def build_placement(name: str, options: PlacementOptions | None, num_layers: int) -> Placement:
    """The placement ``name`` for a ``num_layers`` model; ``options`` must be its ``Options``."""
    cls = get_placement_class(name)
    if options is not None and not isinstance(options, cls.Options):
        raise ConfigError(
            f"model.norm holds options of type {type(options).__name__}, not {cls.Options.__name__} of "
            f"model.norm_placement={name}: resolve them with megaspan.config.loader.norm_options"
        )
    return cls(options, num_layers)

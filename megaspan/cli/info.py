"""``megaspan info``: versions, device, Transformer Engine and the registered norm placements."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

NAME = "info"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(NAME, help="versions, device and registered norm placements")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(format_info())
    return 0


def format_info() -> str:
    import platform

    import torch

    import megaspan
    from megaspan.norms import available

    if torch.cuda.is_available():
        device = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name()})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    lines = [
        f"megaspan             {megaspan.__version__}",
        f"python               {platform.python_version()}",
        f"torch                {torch.__version__}",
        f"megatron-core        {_dist_version('megatron-core')}",
        f"transformer-engine   {_module_version('transformer_engine')}",
        f"device               {device}",
        "norm placements (model.norm_placement; options: model.norm.<option>, all have final_norm):",
    ]
    placements = available()
    width = max(map(len, placements), default=0)
    for name, cls in placements.items():
        lines.append(f"  {name:<{width}} {getattr(cls, 'description', '')}")
        options = placement_options(cls)
        if options:
            lines.append(f"  {'':<{width}} options: {options}")
    return "\n".join(lines)


def placement_options(cls) -> str:
    """``name=default`` of a placement's own options (``final_norm``, common to all, left out)."""
    import dataclasses

    from megaspan.norms import PlacementOptions

    common = {f.name for f in dataclasses.fields(PlacementOptions)}
    own = [f for f in dataclasses.fields(cls.Options) if f.name not in common]
    return ", ".join(f"{f.name}={f.default!r}" for f in own)


def _module_version(module: str) -> str:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return "not installed"
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is information, not a crash
        return f"unavailable ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "unknown"))


def _dist_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"

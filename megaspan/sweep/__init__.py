"""Depth/placement/LR sweeps: expansion (spec), local runner, Slurm submission, cell status.

Torch-free: ``python -m megaspan.sweep`` runs under a bare python3 on a Slurm node.
"""

from __future__ import annotations

from megaspan.sweep.spec import SweepError, cell_args, expand, load, load_sweep, resolve_sweep_file

__all__ = ["SweepError", "cell_args", "expand", "load", "load_sweep", "resolve_sweep_file"]

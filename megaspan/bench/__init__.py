"""``megaspan bench``: time every norm placement against stock Megatron-Core, side by side.

* :mod:`megaspan.bench.presets`: size presets (``cpu-small``, ``cpu``, ``h100-1b``, ``h100-moe``);
* :mod:`megaspan.bench.models`: the timed candidates (placements, ``stock``, ``bare-loop``) and
  the synthetic data;
* :mod:`megaspan.bench.runner`: :func:`run_bench` (build, warm up, time round-robin);
* :mod:`megaspan.bench.flops`: the FLOPs formula and the per-device peak table (MFU);
* :mod:`megaspan.bench.report`: statistics, ratios, JSON, Markdown and ``--compare`` (torch-free).

Importing this package does not import torch.
"""

from __future__ import annotations

from megaspan.bench.presets import PRESETS, Preset, get_preset
from megaspan.bench.report import compare, markdown
from megaspan.bench.runner import PRECISIONS, BenchOptions, run_bench

__all__ = [
    "PRECISIONS",
    "PRESETS",
    "BenchOptions",
    "Preset",
    "compare",
    "get_preset",
    "markdown",
    "run_bench",
]

"""``megaspan plan`` as a library: validate a parallel layout for N GPUs and size every GPU.

* :mod:`~megaspan.plan.planner` - :func:`plan` (validate -> :class:`~megaspan.config.ParallelLayout`
  -> per-stage counts and memory) and the :class:`Plan` value;
* :mod:`~megaspan.plan.counts` - parameter counts from meta-device builds in a fake process group;
* :mod:`~megaspan.plan.memory` - the per-GPU memory model;
* :mod:`~megaspan.plan.format` - the text table.

The command line is :mod:`megaspan.cli.plan`. Importing this package loads no torch.
"""

from __future__ import annotations

from megaspan.plan.format import format_plan
from megaspan.plan.planner import Plan, StagePlan, plan

__all__ = ["Plan", "StagePlan", "format_plan", "plan"]

"""Reports over run dirs and sweep dirs: stability table, plots, config and versions.

``build_report`` is the library function behind ``megaspan report``. Imports matplotlib (Agg)
and tensorboard's event reader lazily through its submodules; no torch.
"""

from __future__ import annotations

__all__ = ["build_report"]


def build_report(*args, **kwargs):
    from megaspan.report.build import build_report as _build

    return _build(*args, **kwargs)

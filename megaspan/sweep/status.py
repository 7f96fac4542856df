"""What state a run dir is in, read from ``<run_dir>/summary.json`` (tolerant of its absence).

The trainer writes ``summary.json`` at the end of a run and on a signal (issue 9 item 2). A run
dir without one is a cell that never ran ("pending"), is running, or crashed before writing it
("incomplete"); the sweep runner re-runs both, and the report shows them as not finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
FINISHED = frozenset({"completed", "diverged"})
"""Statuses a resumed sweep skips: the cell has its answer (divergence is a result, not an error)."""
STATUSES = ("completed", "diverged", "preempted", "failed")
EXIT_FILE = "sweep-cell.exit"
"""The exit code of a cell that failed under the sweep runner (written by it, removed when the
cell starts again): a cell that died before writing summary.json (a bad override, a data error)
showed as "incomplete" and was started again by every run of the sweep."""


def cell_exit_code(run_dir: str | Path) -> int | None:
    try:
        return int((Path(run_dir) / EXIT_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's summary, or None when it is missing, unreadable or not a JSON object."""
    path = Path(run_dir) / SUMMARY
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_status(run_dir: str | Path, summary: dict[str, Any] | None = None) -> str:
    """completed|diverged|preempted|failed from the summary; else pending (no dir) / incomplete."""
    summary = read_summary(run_dir) if summary is None else summary
    status = None
    if summary is not None:
        status = summary.get("status")
        status = status if status in STATUSES else "failed"
    if status not in FINISHED and cell_exit_code(run_dir) is not None:
        return "failed"  # its last start failed, whatever an earlier start's summary says
    if status is not None:
        return status
    return "incomplete" if Path(run_dir).is_dir() else "pending"


def status_label(run_dir: str | Path, summary: dict[str, Any] | None = None) -> str:
    """The status, with the exit code for a cell that failed under the sweep runner."""
    status = run_status(run_dir, summary)
    code = cell_exit_code(run_dir) if status == "failed" else None
    return f"failed (exit {code})" if code is not None else status


def final_loss(summary: dict[str, Any] | None) -> tuple[float | None, str]:
    """(loss, kind): the final validation loss if the run has one, else the final train loss."""
    if not summary:
        return None, ""
    for key, kind in (("final_val_loss", "val"), ("final_train_loss", "train")):
        value = summary.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), kind
    return None, ""


def as_float(value: Any) -> float | None:
    """A JSON number as float (NaN/inf kept: a diverged loss is information); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)

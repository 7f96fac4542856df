"""Downstream task scores against placement and depth, the shape of the papers' tables.

The scores are the in-loop lm-eval ones a run records in ``summary.json``'s ``downstream``
(``eval.downstream``; see :mod:`megaspan.training.callbacks.downstream`): a run's *final* score of
a task metric is the one at its last scored step. A row is one (placement, depth); its runs are
the finished, not diverged seeds (with an LR grid: those at the group's best LR, the same runs the
best-LR table reports); a cell is the mean over those seeds with its 95% t interval
(:func:`megaspan.report.stats.t_interval`).
"""

from __future__ import annotations

from collections import defaultdict

from megaspan.report.collect import RunRecord
from megaspan.report.evidence import groups, has_lr_axis
from megaspan.report.stats import t_interval
from megaspan.report.tables import Table, fmt_lr


def final_scores(run: RunRecord) -> dict[str, float]:
    """``{"<task> <metric>": value}`` at the run's last scored step ({} without scores)."""
    scores = (run.summary or {}).get("downstream")
    if not isinstance(scores, dict):
        return {}
    steps = [k for k in scores if str(k).isdigit() and isinstance(scores[k], dict)]
    if not steps:
        return {}
    last = scores[max(steps, key=int)]
    return {
        f"{task} {metric}": float(value)
        for task, metrics in last.items()
        if isinstance(metrics, dict)
        for metric, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _rows(runs: list[RunRecord]) -> list[tuple[str, int | None, float | None, list[RunRecord]]]:
    """(placement, depth, LR shown, the runs averaged) per row."""
    if has_lr_axis(runs):
        return [(g.placement, g.depth, g.best_lr, g.best_runs()) for g in groups(runs)]
    by: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        if r.status in ("completed", "collapsed"):
            by[(r.placement, r.depth)].append(r)
    rows = []
    for (placement, depth), rs in sorted(
        by.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0)
    ):
        lrs = {r.lr for r in rs}
        rows.append((placement, depth, lrs.pop() if len(lrs) == 1 else None, rs))
    return rows


def downstream_table(runs: list[RunRecord]) -> Table:
    """Placement x depth rows, one column per task metric: the mean final score over the row's
    seeds with its 95% t interval (``-`` where no seed has that score). No rows when no run
    recorded downstream scores."""
    selected = [(p, d, lr, [(r, final_scores(r)) for r in rs]) for p, d, lr, rs in _rows(runs)]
    columns = sorted({key for *_, scored in selected for _, s in scored for key in s})
    headers = ["placement", "depth", "lr", *columns, "seeds"]
    rows = []
    for placement, depth, lr, scored in selected:
        with_scores = [s for _, s in scored if s]
        if not with_scores:
            continue
        cells = []
        for key in columns:
            interval = t_interval(s.get(key) for s in with_scores)
            cells.append("-" if interval is None else interval.text(4))
        rows.append(
            [placement, "-" if depth is None else str(depth), fmt_lr(lr), *cells, str(len(with_scores))]
        )
    return headers, rows

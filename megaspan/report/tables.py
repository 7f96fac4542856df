"""The report's tables, as (headers, rows) of strings, from :class:`RunRecord` s."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from megaspan.report.collect import RunRecord

Table = tuple[list[str], list[list[str]]]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) over the finite values; std is 0 for one value, None for none."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def fmt_mean_std(values: Iterable[float | None]) -> str:
    mean, std, n = mean_std(values)
    return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"


def fmt_lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


@dataclass
class Cell:
    """The seeds of one (placement, lr, depth)."""

    placement: str
    lr: float | None
    depth: int | None
    runs: list[RunRecord]

    @property
    def diverged(self) -> int:
        return sum(r.diverged for r in self.runs)

    @property
    def completed(self) -> int:
        return sum(r.status == "completed" for r in self.runs)

    @property
    def stable(self) -> bool:
        """Trained without divergence: at least one seed completed and none diverged."""
        return self.completed > 0 and self.diverged == 0

    def losses(self, key: str) -> list[float | None]:
        # Diverged seeds carry no meaningful final loss; the table reports them by count instead.
        return [r.summary_float(key) for r in self.runs if not r.diverged]


def _sort_key(value):
    return (value is None, value if value is not None else 0)


def group_cells(runs: list[RunRecord]) -> list[Cell]:
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[(r.placement, r.lr, r.depth)].append(r)
    cells = [Cell(p, lr, d, sorted(rs, key=lambda r: _sort_key(r.seed))) for (p, lr, d), rs in groups.items()]
    return sorted(cells, key=lambda c: (c.placement, _sort_key(c.lr), _sort_key(c.depth)))


def stability_table(runs: list[RunRecord]) -> Table:
    """Per placement and LR: largest depth without divergence, spikes, losses there, seeds."""
    by_pl: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in group_cells(runs):
        by_pl[(cell.placement, cell.lr)].append(cell)
    headers = [
        "placement",
        "lr",
        "largest stable depth",
        "diverged (depths)",
        "loss spikes",
        "final train loss",
        "final val loss",
        "seeds",
    ]
    rows = []
    for (placement, lr), cells in by_pl.items():
        stable = [c for c in cells if c.stable]
        best = max(stable, key=lambda c: _sort_key(c.depth)) if stable else None
        diverged = [c for c in cells if c.diverged]
        div_text = ", ".join(f"L{c.depth}: {c.diverged}/{len(c.runs)}" for c in diverged) or "none"
        spikes = sum(r.spikes for c in cells for r in c.runs)
        rows.append(
            [
                placement,
                fmt_lr(lr),
                "none" if best is None else str(best.depth),
                div_text,
                str(spikes),
                "-" if best is None else fmt_mean_std(best.losses("final_train_loss")),
                "-" if best is None else fmt_mean_std(best.losses("final_val_loss")),
                "0" if best is None else str(len(best.runs)),
            ]
        )
    return headers, rows


def cells_table(runs: list[RunRecord]) -> Table:
    """One row per (placement, lr, depth): statuses, spikes, losses (mean ± std over seeds)."""
    headers = [
        "placement",
        "lr",
        "depth",
        "status",
        "loss spikes",
        "final train loss",
        "final val loss",
        "best val loss",
        "seeds",
    ]
    rows = []
    for c in group_cells(runs):
        counts: dict[str, int] = defaultdict(int)
        for r in c.runs:
            counts[r.status] += 1
        status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        rows.append(
            [
                c.placement,
                fmt_lr(c.lr),
                "-" if c.depth is None else str(c.depth),
                status,
                str(sum(r.spikes for r in c.runs)),
                fmt_mean_std(c.losses("final_train_loss")),
                fmt_mean_std(c.losses("final_val_loss")),
                fmt_mean_std(c.losses("best_val_loss")),
                str(len(c.runs)),
            ]
        )
    return headers, rows


def guard_events_table(runs: list[RunRecord]) -> Table:
    headers = ["run", "step", "kind", "reason", "action"]
    rows = []
    for r in runs:
        for event in (r.summary or {}).get("guard_events") or []:
            if isinstance(event, dict):
                rows.append([r.name, *(str(event.get(k, "")) for k in ("step", "kind", "reason", "action"))])
    return headers, rows

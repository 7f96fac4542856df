"""Two-stage sweeps: an LR grid first, then more seeds at each group's best LR (stdlib only).

A sweep file with a ``best_lr_seeds`` list (and an ``lr`` axis) runs in two stages::

    axes: {placement: [...], depth: [6, 24], lr: [1e-3, 3e-3, 1e-2], seed: [1]}
    best_lr_seeds: [2, 3]

Stage 1 is the cartesian grid. Once every grid cell of a group (same values on every axis except
lr and seed) has finished, the group's best LR is the grid LR with the lowest mean final
validation loss over its finished, non-diverged seeds (:func:`best_lr`), and stage 2 adds one
cell per ``best_lr_seeds`` seed at that LR: the same overrides as the grid cell, another seed,
named like any grid cell (``pre-L24-lr0.003-s2``), so the report groups it with the grid seed.
The choice is a pure function of the grid cells' ``summary.json``, so a resumed sweep picks the
same LR and skips stage-2 cells that already finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from megaspan.sweep.spec import SweepError, format_value, name_part
from megaspan.sweep.status import FINISHED, final_loss, read_summary, run_status

LR_KEY = "optimizer.lr"
SEED_KEY = "training.seed"


def best_lr(losses: Mapping[float, Sequence[float | None]]) -> float | None:
    """The LR whose seeds have the lowest mean loss; ``None`` entries are diverged seeds.

    An LR with a diverged (or non-finite) seed is not a candidate: a best LR that sometimes
    diverges is not one a user can pick. Ties go to the smaller LR. None when no LR qualifies.
    """
    best: tuple[float, float] | None = None
    for lr in sorted(losses):
        values = list(losses[lr])
        if not values or any(v is None or not math.isfinite(v) for v in values):
            continue
        mean = sum(values) / len(values)
        if best is None or mean < best[0]:
            best = (mean, lr)
    return None if best is None else best[1]


def group_key(cell: dict) -> tuple:
    """The values of a cell on every axis but lr and seed (JSON-ish values made hashable)."""
    return tuple(
        (k, format_value(v) if not isinstance(v, str) else v)
        for k, v in sorted(cell["values"].items())
        if k not in (LR_KEY, SEED_KEY)
    )


def _cell_loss(run_dir: Path) -> tuple[str, float | None]:
    summary = read_summary(run_dir)
    status = run_status(run_dir, summary)
    loss, _ = final_loss(summary)
    return status, loss


def stage2_cells(
    sweep: dict, runs_dir: Path, *, loss_of: Callable[[Path], tuple[str, float | None]] = _cell_loss
) -> list[dict]:
    """The stage-2 cells that can be decided now: one per extra seed of each group whose grid
    cells have all finished (completed or diverged). Groups still running get none yet; a group
    where every LR diverged gets none (there is no best LR to repeat)."""
    seeds = sweep.get("best_lr_seeds") or []
    if not seeds:
        return []
    grid = [c for c in sweep["cells"] if not c.get("stage2")]
    groups: dict[tuple, list[dict]] = {}
    for cell in grid:
        if LR_KEY not in cell["values"]:
            raise SweepError("best_lr_seeds needs an lr axis (optimizer.lr)")
        groups.setdefault(group_key(cell), []).append(cell)
    out: list[dict] = []
    names = {c["name"] for c in sweep["cells"]}
    next_index = len(sweep["cells"])
    for cells in groups.values():
        losses: dict[float, list[float | None]] = {}
        done = True
        for cell in cells:
            status, loss = loss_of(Path(runs_dir) / cell["name"])
            if status not in FINISHED:
                done = False
                break
            losses.setdefault(float(cell["values"][LR_KEY]), []).append(
                None if status == "diverged" else loss
            )
        if not done:
            continue
        lr = best_lr(losses)
        if lr is None:
            continue
        template = next(c for c in cells if float(c["values"][LR_KEY]) == lr)
        for seed in seeds:
            if any(c["values"].get(SEED_KEY) == seed and float(c["values"][LR_KEY]) == lr for c in cells):
                continue  # the grid already ran this seed at this LR
            new = _with_seed(template, seed)
            if new["name"] in names:
                continue
            new["index"] = next_index
            next_index += 1
            names.add(new["name"])
            out.append(new)
    return out


def _with_seed(template: dict, seed: int) -> dict:
    old = template["values"].get(SEED_KEY)
    overrides = [o for o in template["overrides"] if not o.startswith(f"{SEED_KEY}=")]
    overrides.append(f"{SEED_KEY}={format_value(seed)}")
    if old is not None:
        name = template["name"]
        old_part, new_part = name_part(SEED_KEY, old), name_part(SEED_KEY, seed)
        if not name.endswith(old_part):
            raise SweepError(f"cell {name}: the seed axis must be the last axis for best_lr_seeds")
        name = name[: -len(old_part)] + new_part
    else:
        name = f"{template['name']}-{name_part(SEED_KEY, seed)}"
    values = dict(template["values"], **{SEED_KEY: seed})
    return {
        "index": -1,
        "name": name,
        "overrides": overrides,
        "values": values,
        "variant": template.get("variant", ""),
        "stage2": True,
    }

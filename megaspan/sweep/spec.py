"""Sweep definitions: a YAML/JSON file -> a list of cells (one ``megaspan train`` each).

A sweep file looks like::

    name: norm-depth               # run dirs: <runs>/<cell-name>, runs defaults to runs/<name>
    config: recipes/small.yaml     # optional: `--config` for every cell (a path next to this
                                   # file, a shipped recipe name such as `tiny`, or a path from
                                   # the job's cwd)
    fixed:                         # dotted overrides applied to every cell
      training.steps: 2000
      model.hidden_size: 512
    axes:                          # cartesian product, first axis slowest
      placement: [pre, spannorm]   # alias of model.norm_placement
      depth: [12, 24, 48]          # alias of model.num_layers
      lr: [1.0e-3, 3.0e-4]         # alias of optimizer.lr
      seed: [1, 2]                 # alias of training.seed
      model.hidden_size: [256]     # any dotted key works as an axis too
    best_lr_seeds: [2, 3]          # optional, needs an lr axis: a second stage, see below

An axis value may also be a labelled bundle of overrides, for variants that differ in more than
one key (the label names the cell and the report's group)::

      placement:
        - pre
        - spannorm
        - {label: spannorm-attn, set: {model.norm_placement: spannorm,
                                       model.norm.span_include_attn_term: true}}

With ``best_lr_seeds``, the axes are stage 1 (the LR grid) and the runner adds stage 2 as the
grid finishes: these seeds at each group's best grid LR (:mod:`megaspan.sweep.stages`).

Aliases (singular or plural): placement(s), depth(s), lr(s), seed(s). Cells are numbered in
row-major order; SLURM_ARRAY_TASK_ID picks one. A cell's name comes from its axis values
(``spannorm-L24-lr0.0003-s1``), not its index, so adding values to an axis keeps the existing
cells' run dirs (and their checkpoints) where they were.

This module is stdlib-only (PyYAML only to read YAML) so the Slurm array script can run it with a
bare ``python3`` on the frozen JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

from megaspan.errors import ConfigError

ALIASES = {
    "placement": "model.norm_placement",
    "placements": "model.norm_placement",
    "depth": "model.num_layers",
    "depths": "model.num_layers",
    "lr": "optimizer.lr",
    "lrs": "optimizer.lr",
    "seed": "training.seed",
    "seeds": "training.seed",
}
# How each known key shows up in a cell name; other keys use their last component.
NAME_PREFIX = {
    "model.norm_placement": "",
    "model.num_layers": "L",
    "optimizer.lr": "lr",
    "training.seed": "s",
}
KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
SWEEP_RECIPE_DIR = Path(__file__).resolve().parents[1] / "config" / "recipes" / "sweeps"


class SweepError(ConfigError):
    """A sweep file that cannot be expanded (bad key, clashing cell names, unreadable file)."""


def format_value(value: Any) -> str:
    """A value as megaspan's dotted-override parser reads it (YAML scalars / flow lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepError(f"non-finite value {value!r}")
        return repr(value)
    if isinstance(value, (int, str)):
        text = str(value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, separators=(",", ":"))
    else:
        raise SweepError(f"unsupported value {value!r} ({type(value).__name__})")
    if any(c in text for c in "\t\n\r"):
        raise SweepError(f"value {text!r} contains a tab or newline")
    return text


def name_part(key: str, value: Any) -> str:
    prefix = NAME_PREFIX[key] if key in NAME_PREFIX else key.rsplit(".", 1)[-1] + "-"
    text = f"{value:g}" if isinstance(value, float) else format_value(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", prefix + text)


def resolve_sweep_file(name_or_path: str | Path) -> Path:
    """A sweep file is a path, or the name of one shipped in megaspan/config/recipes/sweeps."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for suffix in ("", ".yaml", ".yml", ".json"):
        shipped = SWEEP_RECIPE_DIR / f"{name_or_path}{suffix}"
        if shipped.is_file():
            return shipped
    names = sorted(p.stem for p in SWEEP_RECIPE_DIR.glob("*.yaml"))
    raise SweepError(f"sweep file '{name_or_path}' not found (shipped sweeps: {', '.join(names)})")


def load(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SweepError(f"cannot read sweep file {path}: {exc.strerror or exc}") from exc
    if Path(path).suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SweepError(f"{path}: not valid JSON ({exc})") from exc
    else:
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the host python
            raise SweepError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the sweep as .json"
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SweepError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise SweepError(f"{path}: top level must be a mapping")
    return data


def expand(data: dict, source: str = "sweep", base_dir: Path | None = None) -> dict:
    """Validate a sweep definition and return {"name", "config", "cells": [...]}.

    Each cell is ``{"index", "name", "overrides": ["key=value", ...], "values": {key: value},
    "variant": str}``: ``values`` holds the axis values (a bundle's label for a bundle), which the
    report groups by; ``variant`` names the cell's values on axes other than placement, depth,
    lr and seed ("" when there are none). A relative ``config`` that
    exists next to the sweep file (``base_dir``) is made absolute, so cells do not depend on the
    directory the job starts in; anything else (a shipped recipe name such as ``tiny``, or a path
    relative to the job's working directory) is passed unchanged.
    """
    if "cells" in data and "axes" not in data:  # already frozen
        return data
    unknown = set(data) - {"name", "config", "fixed", "axes", "description", "best_lr_seeds"}
    if unknown:
        raise SweepError(f"{source}: unknown top-level keys {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SweepError(f"{source}: 'name' must be a non-empty [A-Za-z0-9._-] string")
    fixed = data.get("fixed") or {}
    axes = data.get("axes") or {}
    if not isinstance(fixed, dict) or not isinstance(axes, dict):
        raise SweepError(f"{source}: 'fixed' and 'axes' must be mappings")
    config = data.get("config")
    if config is not None and not isinstance(config, str):
        raise SweepError(f"{source}: 'config' must be a path")
    if config is not None and base_dir is not None and not Path(config).is_absolute():
        if (base_dir / config).is_file():
            config = str((base_dir / config).resolve())

    axis_keys: list[str] = []
    axis_values: list[list[Any]] = []
    for raw_key, values in axes.items():
        key = ALIASES.get(raw_key, raw_key)
        if not KEY_RE.match(key) or "." not in key:
            raise SweepError(f"{source}: axis {raw_key!r} is neither an alias nor a dotted key")
        if key in axis_keys:
            raise SweepError(f"{source}: axis {key} given twice")
        if values is None or values == []:
            raise SweepError(
                f"{source}: axis {raw_key!r} has no values; give at least one or remove the axis"
            )
        if not isinstance(values, list):
            values = [values]
        axis_keys.append(key)
        axis_values.append(values)
    for key in fixed:
        if not KEY_RE.match(str(key)) or "." not in str(key):
            raise SweepError(f"{source}: fixed key {key!r} is not a dotted key")
        if ALIASES.get(key, key) in axis_keys:
            raise SweepError(f"{source}: {key} is both fixed and an axis")
        if key == "training.run_dir":
            raise SweepError(f"{source}: training.run_dir is set per cell by the launcher")

    for key, values in zip(axis_keys, axis_values):
        for value in values:
            if _is_bundle(value):
                _check_bundle(value, key, source)

    cells = []
    seen: dict[str, int] = {}
    for index, combo in enumerate(itertools.product(*axis_values)):
        overrides = [f"{k}={format_value(v)}" for k, v in fixed.items()]
        for k, v in zip(axis_keys, combo):
            if _is_bundle(v):
                overrides += [f"{bk}={format_value(bv)}" for bk, bv in v["set"].items()]
            else:
                overrides.append(f"{k}={format_value(v)}")
        # A bundle is named by its label alone; other values by their key's prefix + value.
        parts = [v["label"] if _is_bundle(v) else name_part(k, v) for k, v in zip(axis_keys, combo)]
        combo = tuple(v["label"] if _is_bundle(v) else v for v in combo)
        cell_name = "-".join(parts) or "base"
        # Axes other than the four the report groups by (placement, depth, lr, seed) make a
        # variant of the placement (e.g. dense vs moe8); the report keeps variants apart.
        variant = "-".join(p for k, p in zip(axis_keys, parts) if k not in NAME_PREFIX)
        if cell_name in seen:
            raise SweepError(f"{source}: cells {seen[cell_name]} and {index} both get the name {cell_name!r}")
        seen[cell_name] = index
        cells.append(
            {
                "index": index,
                "name": cell_name,
                "overrides": overrides,
                "values": dict(zip(axis_keys, combo)),
                "variant": variant,
            }
        )
    out = {"name": name, "config": config, "cells": cells}
    seeds = data.get("best_lr_seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in seeds
        ):
            raise SweepError(f"{source}: 'best_lr_seeds' must be a list of integer seeds, e.g. [2, 3]")
        if "optimizer.lr" not in axis_keys:
            raise SweepError(
                f"{source}: 'best_lr_seeds' needs an lr axis (the grid the best LR is picked from)"
            )
        if "training.seed" in axis_keys and axis_keys[-1] != "training.seed":
            raise SweepError(f"{source}: with 'best_lr_seeds' the seed axis must come last")
        out["best_lr_seeds"] = seeds
    return out


def _is_bundle(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"label", "set"}


def _check_bundle(value: dict, axis: str, source: str) -> None:
    label, overrides = value["label"], value["set"]
    if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9.+_-]+", label):
        raise SweepError(f"{source}: axis {axis}: label {label!r} must be a [A-Za-z0-9.+_-] string")
    if not isinstance(overrides, dict) or not overrides:
        raise SweepError(f"{source}: axis {axis}: bundle {label!r} needs a non-empty 'set' mapping")
    for key in overrides:
        if not KEY_RE.match(str(key)) or "." not in str(key):
            raise SweepError(f"{source}: axis {axis}: bundle {label!r} key {key!r} is not a dotted key")


def load_sweep(name_or_path: str | Path) -> dict:
    """Read and expand a sweep file (a path or a shipped sweep name)."""
    path = resolve_sweep_file(name_or_path)
    return expand(load(path), str(path), path.parent)


def cell_args(sweep: dict, index: int) -> list[str]:
    """``megaspan train`` arguments of cell ``index`` (without ``training.run_dir``)."""
    cells = sweep["cells"]
    if not 0 <= index < len(cells):
        raise SweepError(f"cell {index} out of range: the sweep has {len(cells)} cells (0..{len(cells) - 1})")
    args = []
    if sweep.get("config"):
        args += ["--config", sweep["config"]]
    return args + wandb_overrides(sweep, cells[index]) + cells[index]["overrides"]


def wandb_overrides(sweep: dict, cell: dict) -> list[str]:
    """W&B grouping of a cell: group = the sweep's name, name = the cell's, tags = its placement,
    depth, LR and seed (``placement:spannorm``, ``depth:12``, ...). Given to every cell (the sweep
    tool stays stdlib-only, so it cannot read the config to see whether W&B is on); they do
    nothing unless ``logging.wandb.project`` is set, and come before the cell's own overrides, so
    a sweep's ``fixed``/axes values win."""
    labels = {"model.norm_placement": "placement", "model.num_layers": "depth", "optimizer.lr": "lr"}
    labels["training.seed"] = "seed"
    tags = [f"{labels[k]}:{format_value(v)}" for k, v in cell["values"].items() if k in labels]
    return [
        f"logging.wandb.group={sweep['name']}",
        f"logging.wandb.name={cell['name']}",
        f"logging.wandb.tags={format_value(tags)}",
    ]


def freeze(sweep: dict, path: Path) -> None:
    """Write the resolved cells as JSON (read later with no PyYAML and no edits to the YAML)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(sweep, indent=1) + "\n")

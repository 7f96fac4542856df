#!/usr/bin/env python3
"""Expand a megaspan sweep definition into job-array cells.

A sweep file (YAML, or JSON without PyYAML) looks like::

    name: norm-depth               # run dirs: <runs>/<name>/<cell-name>
    config: recipes/small.yaml     # optional: `--config` for every cell (a path next to this
                                   # file, a shipped recipe name, or a path from the job's cwd)
    fixed:                         # dotted overrides applied to every cell
      training.steps: 2000
      model.hidden_size: 512
    axes:                          # cartesian product, first axis slowest
      placement: [pre, spannorm]   # alias of model.norm_placement
      depth: [12, 24, 48]          # alias of model.num_layers
      lr: [1.0e-3, 3.0e-4]         # alias of optimizer.lr
      seed: [1, 2]                 # alias of training.seed
      model.hidden_size: [256]     # any dotted key works as an axis too

Aliases (singular or plural): placement(s), depth(s), lr(s), seed(s). Cells are numbered in
row-major order; SLURM_ARRAY_TASK_ID picks one. A cell's name comes from its axis values
(``spannorm-L24-lr0.0003-s1``), not its index, so adding values to an axis keeps the existing
cells' run dirs (and their checkpoints) where they were.

    launch/sweep.py --list sweep.yaml             # table of cells + array size
    launch/sweep.py --count sweep.yaml            # just N
    launch/sweep.py --name sweep.yaml             # just the sweep's name
    launch/sweep.py --cell 3 sweep.yaml           # name, then one megaspan arg per line
    launch/sweep.py --freeze out.json sweep.yaml  # resolved cells as JSON (needs no PyYAML later)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

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


class SweepError(ValueError):
    pass


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


def load(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the host python
            raise SweepError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the sweep as .json"
            ) from exc
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise SweepError(f"{path}: top level must be a mapping")
    return data


def expand(data: dict, source: str = "sweep", base_dir: Path | None = None) -> dict:
    """Validate a sweep definition and return {"name", "config", "cells": [...]}.

    A relative ``config`` that exists next to the sweep file (``base_dir``) is made absolute, so
    cells do not depend on the directory the job starts in; anything else (a shipped recipe name
    such as ``tiny``, or a path relative to the job's working directory) is passed unchanged.
    """
    if "cells" in data and "axes" not in data:  # already frozen
        return data
    unknown = set(data) - {"name", "config", "fixed", "axes", "description"}
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
        if not isinstance(values, list) or not values:
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

    cells = []
    seen: dict[str, int] = {}
    for index, combo in enumerate(itertools.product(*axis_values)):
        overrides = [f"{k}={format_value(v)}" for k, v in fixed.items()]
        overrides += [f"{k}={format_value(v)}" for k, v in zip(axis_keys, combo)]
        cell_name = "-".join(name_part(k, v) for k, v in zip(axis_keys, combo)) or "base"
        if cell_name in seen:
            raise SweepError(
                f"{source}: cells {seen[cell_name]} and {index} both get the name {cell_name!r}"
            )
        seen[cell_name] = index
        cells.append({"index": index, "name": cell_name, "overrides": overrides})
    return {"name": name, "config": config, "cells": cells}


def cell_args(sweep: dict, index: int) -> list[str]:
    cells = sweep["cells"]
    if not 0 <= index < len(cells):
        raise SweepError(f"cell {index} out of range: the sweep has {len(cells)} cells (0..{len(cells) - 1})")
    args = []
    if sweep.get("config"):
        args += ["--config", sweep["config"]]
    return args + cells[index]["overrides"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the cells and the array size")
    mode.add_argument("--count", action="store_true", help="print the number of cells")
    mode.add_argument("--name", action="store_true", help="print the sweep's name")
    mode.add_argument("--cell", type=int, metavar="I", help="print cell I: its name, then its args")
    mode.add_argument("--freeze", metavar="OUT.json", help="write the resolved cells as JSON")
    parser.add_argument("sweep", type=Path, help="sweep definition (.yaml/.yml/.json) or frozen .json")
    args = parser.parse_args(argv)
    try:
        sweep = expand(load(args.sweep), str(args.sweep), args.sweep.parent)
        n = len(sweep["cells"])
        if args.count:
            print(n)
        elif args.name:
            print(sweep["name"])
        elif args.cell is not None:
            out = cell_args(sweep, args.cell)
            print(f"{sweep['name']}/{sweep['cells'][args.cell]['name']}")
            print("\n".join(out))
        elif args.freeze:
            Path(args.freeze).write_text(json.dumps(sweep, indent=1) + "\n")
            print(n)
        else:
            for cell in sweep["cells"]:
                print(f"{cell['index']:4d}  {sweep['name']}/{cell['name']}  {' '.join(cell['overrides'])}")
            if sweep.get("config"):
                print(f"config: {sweep['config']}")
            print(f"array size: {n}  (sbatch --array=0-{n - 1} launch/slurm/sweep.sbatch {args.sweep})")
    except (SweepError, OSError, json.JSONDecodeError) as exc:
        print(f"sweep.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

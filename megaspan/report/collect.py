"""Read run dirs (and sweep dirs of run dirs) into :class:`RunRecord` s for the report.

Everything is optional and read tolerantly: a run without ``summary.json`` is reported as
pending/incomplete, a run without TensorBoard events falls back to ``train.log``, a run without
``diagnostics.jsonl`` simply has no per-layer profile.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaspan.errors import RunDirError
from megaspan.sweep.runner import FROZEN
from megaspan.sweep.status import as_float, read_summary, status_label

TRAIN_TAGS = ("train/loss",)
VAL_TAGS = ("valid/loss", "val/loss")  # the trainer's tag is valid/loss; val/loss is the contract's name
DIAGNOSTICS = "diagnostics.jsonl"
_STEP_RE = re.compile(r"step (\d+)/\d+ \| loss ([-+0-9.eEnaifNI]+)")
_VAL_RE = re.compile(r"valid loss ([-+0-9.eEnaifNI]+) .*\| step (\d+)")


@dataclass
class RunRecord:
    path: Path
    name: str
    status: str
    summary: dict[str, Any] | None
    config: dict[str, Any]
    placement: str
    depth: int | None
    lr: float | None
    seed: int | None
    sweep: str = ""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def summary_float(self, key: str) -> float | None:
        return as_float((self.summary or {}).get(key))

    @property
    def spikes(self) -> int:
        value = (self.summary or {}).get("loss_spikes")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _read_config(run_dir: Path, summary: dict[str, Any] | None) -> dict[str, Any]:
    if summary and isinstance(summary.get("config"), dict):
        return summary["config"]
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def _sweep_labels(sweep_dir: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(sweep name, {cell name: cell}) from the runner's sweep.json, if there is one."""
    try:
        data = json.loads((sweep_dir / FROZEN).read_text())
    except (OSError, ValueError):
        return "", {}
    cells = {c.get("name"): c for c in data.get("cells", []) if isinstance(c, dict)}
    return str(data.get("name", "")), cells


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("summary.json", "config.yaml", "train.log", "tensorboard"))


def read_run(run_dir: Path, sweep: str = "", cell: dict[str, Any] | None = None) -> RunRecord:
    summary = read_summary(run_dir)
    config = _read_config(run_dir, summary)
    values = (cell or {}).get("values") or {}
    variant = (cell or {}).get("variant") or ""

    def pick(key: str) -> Any:
        # The sweep's axis value (a bundle's label, e.g. spannorm-attn) wins over the config.
        return values[key] if key in values else _get(config, key)

    placement = pick("model.norm_placement")
    depth, lr, seed = pick("model.num_layers"), pick("optimizer.lr"), pick("training.seed")
    record = RunRecord(
        path=run_dir,
        name=run_dir.name,
        status=status_label(run_dir, summary),
        summary=summary,
        config=config,
        placement=(str(placement) if placement is not None else "?") + (f"/{variant}" if variant else ""),
        depth=int(depth) if isinstance(depth, (int, float)) else None,
        lr=float(lr) if isinstance(lr, (int, float)) else None,
        seed=int(seed) if isinstance(seed, (int, float)) else None,
        sweep=sweep,
    )
    record.curves = loss_curves(run_dir)
    return record


def collect(paths: list[str | Path]) -> list[RunRecord]:
    """Every run under ``paths`` (each a run dir, or a sweep dir whose subdirs are run dirs)."""
    runs: list[RunRecord] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise RunDirError(f"{path} is not a directory (give run dirs or sweep dirs, e.g. runs/cpu-small)")
        if is_run_dir(path):
            sweep, cells = _sweep_labels(path.parent)
            runs.append(read_run(path, sweep, cells.get(path.name)))
            continue
        sweep, cells = _sweep_labels(path)
        names = set(cells) | {p.name for p in path.iterdir() if p.is_dir() and is_run_dir(p)}
        for name in sorted(names):
            runs.append(read_run(path / name, sweep or path.name, cells.get(name)))
    if not runs:
        raise RunDirError(
            f"no run dirs found under {', '.join(map(str, paths))} "
            "(a run dir holds summary.json, config.yaml or train.log)"
        )
    return runs


def loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "val": [...]} from TensorBoard events, else from train.log."""
    curves = _tensorboard_curves(run_dir / "tensorboard")
    if not curves.get("train"):
        curves = _log_curves(run_dir / "train.log")
    return curves


def _tensorboard_curves(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    out: dict[str, list[tuple[int, float]]] = {}
    for kind, candidates in (("train", TRAIN_TAGS), ("val", VAL_TAGS)):
        for tag in candidates:
            if tag in tags:
                # A resumed run writes some steps twice; the later write is the one that counts.
                by_step = {e.step: float(e.value) for e in acc.Scalars(tag)}
                out[kind] = sorted(by_step.items())
                break
    return out


def _log_curves(log: Path) -> dict[str, list[tuple[int, float]]]:
    if not log.is_file():
        return {}
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if m := _STEP_RE.search(line):
            train[int(m.group(1))] = _float(m.group(2))
        elif m := _VAL_RE.search(line):
            val[int(m.group(2))] = _float(m.group(1))
    return {"train": sorted(train.items()), "val": sorted(val.items())}


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def last_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """The last complete record of ``diagnostics.jsonl`` (a torn last line is ignored)."""
    path = Path(run_dir) / DIAGNOSTICS
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("layers"), dict):
            last = record
    return last

"""megaspan report on synthetic run dirs: stability table, PNGs that decode, figure contents."""

from __future__ import annotations

import json
import math
from pathlib import Path

# matplotlib is a hard dependency (pyproject.toml): without it this module fails, never skips.
import matplotlib.image as mpimg
import pytest

from megaspan.report import build_report
from megaspan.report.collect import collect
from megaspan.report.tables import stability_table

PLACEMENTS = ("post", "pre", "spannorm")
DEPTHS = (2, 4, 8)
SEEDS = (1, 2)
LR = 0.01


def _final(placement: str, depth: int, seed: int) -> float:
    return 4.0 - 0.1 * math.log2(depth) + (0.05 if placement == "pre" else 0.0) + 0.01 * seed


def _write_run(run_dir: Path, placement: str, depth: int, seed: int, *, diverged: bool, tb: bool) -> None:
    run_dir.mkdir(parents=True)
    config = {
        "model": {"norm_placement": placement, "num_layers": depth},
        "optimizer": {"lr": LR},
        "training": {"seed": seed, "steps": 20},
    }
    final = _final(placement, depth, seed)
    summary = {
        "status": "diverged" if diverged else "completed",
        "steps": 20,
        "tokens": 1000,
        "wall_time_s": 1.0,
        "tokens_per_s": 1000.0,
        "final_train_loss": None if diverged else final + 0.1,
        "final_val_loss": None if diverged else final,
        "best_val_loss": None if diverged else final,
        "loss_spikes": 2 if diverged else 0,
        "guard_events": [{"step": 12, "kind": "nonfinite", "reason": "loss nan", "action": "stop"}]
        if diverged
        else [],
        "config": config,
        "versions": {"torch": "2.x", "megaspan": "0.1.0"},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    steps = range(1, 21, 2)
    if tb:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        for s in steps:
            writer.add_scalar("train/loss", final + 2.0 / s, s)
        writer.add_scalar("valid/loss", final + 0.2, 10)
        writer.add_scalar("valid/loss", final, 20)
        writer.close()
    else:
        log = [f"step {s}/20 | loss {final + 2.0 / s:.6f} | lr 1e-3" for s in steps]
        log += [
            f"valid loss {final + 0.2:.6f} | ppl 3.0 | step 10",
            f"valid loss {final:.6f} | ppl 3.0 | step 20",
        ]
        (run_dir / "train.log").write_text("\n".join(log) + "\n")
    records = []
    for step in (10, 20):
        layers = {
            str(i): {
                "rms": float(i),
                "token_cosine": 0.1 * i,
                "angular_distance": 0.5 / i,
                "attn_grad_norm": 1.0,
                "mlp_grad_norm": 2.0,
                "max_abs": 3.0,
            }
            for i in range(1, depth + 1)
        }
        records.append(json.dumps({"step": step, "layers": layers}))
    (run_dir / "diagnostics.jsonl").write_text("\n".join(records) + '\n{"step": 30, "lay')  # torn line


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """The synthetic sweep, written once per module: the tests only read it (reports go elsewhere)."""
    root = tmp_path_factory.mktemp("sweep") / "demo"
    cells = []
    for p in PLACEMENTS:
        for d in DEPTHS:
            for s in SEEDS:
                name = f"{p}-L{d}-lr{LR:g}-s{s}"
                # Post-LN diverges at depth 8 (both seeds); TB events for half the runs, train.log else.
                _write_run(root / name, p, d, s, diverged=(p == "post" and d == 8), tb=(s == 1))
                cells.append(
                    {
                        "index": len(cells),
                        "name": name,
                        "overrides": [],
                        "values": {
                            "model.norm_placement": p,
                            "model.num_layers": d,
                            "optimizer.lr": LR,
                            "training.seed": s,
                        },
                    }
                )
    # A cell the runner never reached: no run dir, listed in sweep.json only.
    cells.append(
        {
            "index": len(cells),
            "name": "pre-L16-lr0.01-s1",
            "overrides": [],
            "values": {
                "model.norm_placement": "pre",
                "model.num_layers": 16,
                "optimizer.lr": LR,
                "training.seed": 1,
            },
        }
    )
    (root / "sweep.json").write_text(json.dumps({"name": "demo", "config": None, "cells": cells}))
    return root


def test_stability_table(sweep_dir):
    runs = collect([sweep_dir])
    assert len(runs) == len(PLACEMENTS) * len(DEPTHS) * len(SEEDS) + 1
    headers, rows = stability_table(runs)
    by_placement = {row[0]: dict(zip(headers, row)) for row in rows}
    assert by_placement["post"]["largest stable depth"] == "4"
    assert by_placement["post"]["diverged (depths)"] == "L8: 2/2"
    assert by_placement["post"]["loss spikes"] == "4"
    assert by_placement["pre"]["largest stable depth"] == "8"  # L16 never ran: not "stable"
    assert by_placement["spannorm"]["seeds"] == "2"
    vals = [_final("spannorm", 8, s) for s in SEEDS]
    mean = sum(vals) / 2
    std = math.sqrt(sum((v - mean) ** 2 for v in vals))  # n-1 = 1
    assert by_placement["spannorm"]["final val loss"] == f"{mean:.4f} ± {std:.4f}"


def test_curves_from_tensorboard_and_log(sweep_dir):
    runs = {r.name: r for r in collect([sweep_dir])}
    tb, log = runs["pre-L4-lr0.01-s1"], runs["pre-L4-lr0.01-s2"]
    assert (tb.path / "tensorboard").is_dir() and not (log.path / "tensorboard").exists()
    for r in (tb, log):
        assert [s for s, _ in r.curves["train"]] == list(range(1, 21, 2))
        assert [s for s, _ in r.curves["val"]] == [10, 20]
    assert tb.curves["val"][-1][1] == pytest.approx(_final("pre", 4, 1), abs=1e-6)


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_writes_table_and_decodable_pngs(sweep_dir, tmp_path, fmt):
    out = tmp_path / "report"
    report = build_report([sweep_dir], out, fmt)
    page = report.page.read_text()
    assert report.page == out / f"report.{fmt}"
    assert "largest stable depth" in page and "L8: 2/2" in page
    # One vs-depth plot (one LR), one curve plot per depth incl. the never-run L16? no: it has no curve.
    names = sorted(p.name for p in report.images)
    assert names == sorted(
        ["val_loss_vs_depth_lr0.01.png"]
        + [f"loss_curves_L{d}.png" for d in DEPTHS]
        + [f"layer_profiles_L{d}_lr0.01.png" for d in DEPTHS]
    )
    for path in report.images:
        image = mpimg.imread(path)
        assert path.stat().st_size > 0 and image.shape[0] > 100 and image.shape[1] > 100
        if fmt == "md":
            assert f"]({path.name})" in page
    if fmt == "html":
        assert page.count("data:image/png;base64,") == len(report.images)

    ax = report.figures["val_loss_vs_depth_lr0.01"].axes[0]
    assert len(ax.containers) == len(PLACEMENTS)  # one errorbar line per placement
    points = {c.get_label(): len(c.lines[0].get_xdata()) for c in ax.containers}
    assert points == {"post": 2, "pre": 3, "spannorm": 3}  # post has no val loss at the diverged L8
    diverged = [c for c in ax.collections if c.get_label() == "diverged (a seed)"]
    assert len(diverged) == 1 and len(diverged[0].get_offsets()) == 1  # post at L8

    curves = report.figures["loss_curves_L4"].axes[0]
    assert sorted(line.get_label() for line in curves.lines) == sorted(
        [f"{p} (train)" for p in PLACEMENTS] + [f"{p} (val)" for p in PLACEMENTS]
    )
    assert all(len(line.get_xdata()) in (10, 2) for line in curves.lines)

    profiles = report.figures["layer_profiles_L4_lr0.01"].axes
    assert len(profiles) == 4
    for ax in profiles:
        assert len(ax.lines) == len(PLACEMENTS)
        assert all(len(line.get_xdata()) == 4 for line in ax.lines)  # one point per layer
    grad = next(line for line in profiles[0].lines if line.get_label().startswith("pre"))
    assert grad.get_ydata()[0] == pytest.approx(math.sqrt(5.0))  # sqrt(attn^2 + mlp^2)
    assert "step 20" in grad.get_label()  # the last complete record, not the torn line


def test_missing_summary_is_tolerated(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "train.log").write_text("step 1/2 | loss 5.0 | lr 1\n")
    report = build_report([run], tmp_path / "out")
    assert report.runs[0].status == "incomplete"
    assert "No versions recorded" in report.page.read_text()


def test_no_runs_is_a_user_error(tmp_path):
    from megaspan.errors import RunDirError

    with pytest.raises(RunDirError, match="no run dirs"):
        build_report([tmp_path], tmp_path / "out")
    with pytest.raises(RunDirError, match="not a directory"):
        build_report([tmp_path / "nope"], tmp_path / "out")


def test_variants_are_reported_apart(tmp_path):
    """Cells that differ on a non-core axis (dense vs MoE) are separate rows, not pooled seeds."""
    from megaspan.sweep import expand
    from megaspan.sweep.runner import FROZEN

    sweep = expand(
        {
            "name": "v",
            "axes": {
                "model.moe.num_experts": [
                    {"label": "dense", "set": {"model.moe.num_experts": None}},
                    {"label": "moe4", "set": {"model.moe.num_experts": 4}},
                ],
                "placement": ["pre"],
                "depth": [2],
            },
        }
    )
    root = tmp_path / "v"
    for cell in sweep["cells"]:
        _write_run(root / cell["name"], "pre", 2, 1, diverged=False, tb=False)
    (root / FROZEN).write_text(json.dumps(sweep))
    headers, rows = stability_table(collect([root]))
    assert sorted(row[0] for row in rows) == ["pre/dense", "pre/moe4"]
    assert [c["name"] for c in sweep["cells"]] == ["dense-pre-L2", "moe4-pre-L2"]


def test_cli_report(sweep_dir, tmp_path, capsys):
    from megaspan.cli import main

    assert main(["report", str(sweep_dir), "-o", str(tmp_path / "out"), "--format", "html"]) == 0
    assert "report.html (19 runs, 7 plots)" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "megaspan: error:" in capsys.readouterr().err


def test_a_failed_run_counts_in_the_tables_and_seeds(tmp_path):
    """A failed seed (crashed, exit code recorded by the sweep runner) is neither dropped from the
    cell nor counted as a trained one: the cell shows it, and its seed count includes it."""
    from megaspan.report.tables import cells_table
    from megaspan.sweep.status import EXIT_FILE

    root = tmp_path / "f"
    _write_run(root / "spannorm-L2-s1", "spannorm", 2, 1, diverged=False, tb=False)
    failed = root / "spannorm-L2-s2"
    _write_run(failed, "spannorm", 2, 2, diverged=False, tb=False)
    summary = json.loads((failed / "summary.json").read_text())
    summary.update(status="failed", final_train_loss=None, final_val_loss=None, best_val_loss=None)
    (failed / "summary.json").write_text(json.dumps(summary))
    (failed / EXIT_FILE).write_text("1\n")
    runs = collect([root])
    assert sorted(r.status for r in runs) == ["completed", "failed (exit 1)"]
    headers, rows = cells_table(runs)
    [row] = [dict(zip(headers, r)) for r in rows]
    assert row["status"] == "1 completed, 1 failed (exit 1)" and row["seeds"] == "2"
    headers, rows = stability_table(runs)
    [row] = [dict(zip(headers, r)) for r in rows]
    assert row["seeds"] == "2"
    # its loss is not averaged in: the completed seed's alone
    assert row["final val loss"].startswith(f"{_final('spannorm', 2, 1):.4f}")

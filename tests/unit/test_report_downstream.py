"""The report's downstream table on synthetic run dirs: final scores (the last scored step, steps
compared as numbers), mean and 95% t interval over seeds, diverged seeds and runs without scores
left out, best-LR selection on an LR grid. Every expected cell is computed by hand below."""

from __future__ import annotations

import json
from pathlib import Path

from megaspan.report import build_report
from megaspan.report.collect import collect
from megaspan.report.downstream import downstream_table

T975_DF2 = 4.302653  # Student t 97.5% quantile, 2 degrees of freedom


def _run(
    root: Path,
    name: str,
    placement: str,
    depth: int,
    seed: int,
    *,
    lr: float = 0.01,
    status: str = "completed",
    final_val: float = 3.0,
    downstream: dict | None = None,
) -> None:
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "status": status,
        "steps": 10,
        "final_val_loss": None if status == "diverged" else final_val,
        "final_train_loss": None if status == "diverged" else final_val,
        "initial_val_loss": 6.0,
        "config": {
            "model": {"norm_placement": placement, "num_layers": depth},
            "optimizer": {"lr": lr},
            "training": {"seed": seed, "steps": 10},
        },
    }
    if downstream is not None:
        summary["downstream"] = downstream
    (run / "summary.json").write_text(json.dumps(summary))


def _scores(acc: float, acc_norm: float, early: float = 0.0) -> dict:
    # Step 5 sorts after step 10 as a string: the final score must be step 10's.
    return {
        "10": {"hellaswag": {"acc": acc, "acc_norm": acc_norm}},
        "5": {"hellaswag": {"acc": early, "acc_norm": early}},
    }


def _one_lr_sweep(root: Path) -> None:
    for seed, acc in zip((1, 2, 3), (0.30, 0.32, 0.34)):
        _run(root, f"span-L4-s{seed}", "spannorm", 4, seed, downstream=_scores(acc, acc + 0.1))
    _run(root, "span-L4-s4", "spannorm", 4, 4, status="diverged", downstream=_scores(0.9, 0.9))
    _run(root, "pre-L4-s1", "pre", 4, 1, downstream=_scores(0.25, 0.5))
    _run(root, "pre-L4-s2", "pre", 4, 2)  # no scores recorded: not a seed of the table
    _run(root, "pre-L2-s1", "pre", 2, 1)  # no run of the row has scores: no row


def test_the_table_is_the_mean_and_t_interval_of_the_final_scores(tmp_path: Path) -> None:
    _one_lr_sweep(tmp_path)
    headers, rows = downstream_table(collect([tmp_path]))
    assert headers == ["placement", "depth", "lr", "hellaswag acc", "hellaswag acc_norm", "seeds"]
    # spannorm: mean 0.32, sample sd 0.02 (0.40 -> 0.44 for acc_norm), half = t(2) * sd / sqrt(3).
    half = T975_DF2 * 0.02 / 3**0.5
    span = f"{0.32:.4f} [{0.32 - half:.4f}, {0.32 + half:.4f}] (n=3)"
    span_norm = f"{0.42:.4f} [{0.42 - half:.4f}, {0.42 + half:.4f}] (n=3)"
    assert span == "0.3200 [0.2703, 0.3697] (n=3)"  # the hand computation, written out
    assert rows == [
        ["pre", "4", "0.01", "0.2500 (n=1, no interval)", "0.5000 (n=1, no interval)", "1"],
        ["spannorm", "4", "0.01", span, span_norm, "3"],
    ]


def test_on_an_lr_grid_each_row_is_its_best_lr(tmp_path: Path) -> None:
    # lr 0.01 has the lower validation loss: its scores are reported, not lr 0.03's.
    for seed in (1, 2):
        _run(
            tmp_path,
            f"a-s{seed}",
            "spannorm",
            4,
            seed,
            lr=0.01,
            final_val=2.0,
            downstream=_scores(0.5 + 0.1 * seed, 0.7),
        )
        _run(
            tmp_path, f"b-s{seed}", "spannorm", 4, seed, lr=0.03, final_val=2.5, downstream=_scores(0.1, 0.1)
        )
    headers, rows = downstream_table(collect([tmp_path]))
    # acc 0.6 and 0.7: mean 0.65, sd 0.0707107, half = t(1) * sd / sqrt(2) = 12.706205 * 0.05.
    half = 12.706205 * 0.05
    assert rows == [
        [
            "spannorm",
            "4",
            "0.01",
            f"0.6500 [{0.65 - half:.4f}, {0.65 + half:.4f}] (n=2)",
            "0.7000 [0.7000, 0.7000] (n=2)",
            "2",
        ]
    ]


def test_the_report_has_the_table_only_when_runs_have_scores(tmp_path: Path) -> None:
    _one_lr_sweep(tmp_path / "sweep")
    page = build_report([tmp_path / "sweep"], tmp_path / "out").page.read_text()
    assert "## Downstream tasks vs placement and depth" in page
    assert "| spannorm | 4 | 0.01 | 0.3200 [0.2703, 0.3697] (n=3) |" in page
    _run(tmp_path / "plain", "r", "pre", 2, 1)
    page = build_report([tmp_path / "plain"], tmp_path / "out2").page.read_text()
    assert "Downstream tasks" not in page

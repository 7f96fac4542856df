"""Two-stage sweeps (LR grid, then seeds at the best LR) and the in-process sweep workers.

The worker tests run the real ``python -m megaspan.sweep.worker`` processes and the real runner,
with a stand-in entry point (``fake_entry:main``) in place of ``megaspan.cli:main`` that writes
the summary.json a run would, so the scheduling, resume and crash handling run in seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from megaspan.sweep import expand
from megaspan.sweep.runner import FROZEN, run_local
from megaspan.sweep.spec import SweepError
from megaspan.sweep.stages import best_lr, stage2_cells

SWEEP = {
    "name": "two-stage",
    "config": "tiny",
    "fixed": {"training.steps": 4},
    "axes": {"placement": ["pre", "post"], "depth": [2], "lr": [1.0e-3, 3.0e-3, 1.0e-2], "seed": [1]},
    "best_lr_seeds": [2, 3],
}

# Loss per (placement, lr): pre is best at 3e-3; post diverges at 1e-2 and is best at 1e-3.
# The cell named in ./crash kills its worker with os._exit (a segfault, as far as the runner knows).
FAKE_ENTRY = r"""
import json, os
from pathlib import Path

LOSS = {("pre", 0.001): 4.0, ("pre", 0.003): 3.5, ("pre", 0.01): 3.8,
        ("post", 0.001): 4.2, ("post", 0.003): 4.4, ("post", 0.01): None}

def main(argv):
    assert argv[0] == "train", argv
    kv = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    run_dir = Path(kv["training.run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / "calls.txt", "a") as f:
        f.write(f"{os.getpid()} {run_dir.name}\n")
    interrupt = run_dir.parent / "interrupt"
    if interrupt.exists() and interrupt.read_text().strip() == run_dir.name:
        import signal
        os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C reaches the runner while this cell finishes
    crash = run_dir.parent / "crash"
    if crash.exists() and crash.read_text().strip() == run_dir.name:
        crash.unlink()
        os._exit(7)
    print("training", run_dir.name)  # goes to the cell's log, not the protocol stream
    loss = LOSS[(kv["model.norm_placement"], float(kv["optimizer.lr"]))]
    seed = int(kv["training.seed"])
    status = "diverged" if loss is None else "completed"
    summary = {"status": status, "final_val_loss": None if loss is None else loss + 0.01 * seed}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return 3 if loss is None else 0
"""


def test_best_lr_rule():
    # Hand-computed: means 4.0, 3.5 (3.4, 3.6), diverged -> 3e-3.
    assert best_lr({1e-3: [4.0], 3e-3: [3.4, 3.6], 1e-2: [None]}) == 3e-3
    # A diverged seed disqualifies its LR even when the other seed is the lowest loss of all.
    assert best_lr({1e-3: [4.0], 3e-3: [2.0, None]}) == 1e-3
    assert best_lr({1e-3: [4.0], 3e-3: [math.nan]}) == 1e-3
    # Ties go to the smaller LR; nothing finite -> None.
    assert best_lr({3e-3: [3.0], 1e-3: [3.0]}) == 1e-3
    assert best_lr({1e-3: [None], 1e-2: []}) is None


def _summary(run_dir: Path, status: str, loss: float | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "final_val_loss": loss}))


def test_stage2_cells_wait_for_the_whole_grid(tmp_path):
    sweep = expand(SWEEP)
    assert sweep["best_lr_seeds"] == [2, 3] and len(sweep["cells"]) == 6
    _summary(tmp_path / "pre-L2-lr0.001-s1", "completed", 4.0)
    _summary(tmp_path / "pre-L2-lr0.003-s1", "completed", 3.5)
    _summary(tmp_path / "pre-L2-lr0.01-s1", "diverged", None)
    _summary(tmp_path / "post-L2-lr0.001-s1", "completed", 4.2)
    _summary(tmp_path / "post-L2-lr0.003-s1", "preempted", 3.0)  # not finished: post waits
    new = stage2_cells(sweep, tmp_path)
    assert [c["name"] for c in new] == ["pre-L2-lr0.003-s2", "pre-L2-lr0.003-s3"]
    assert [c["index"] for c in new] == [6, 7]
    assert new[0]["overrides"][-1] == "training.seed=2"
    assert sum(o.startswith("training.seed=") for o in new[0]["overrides"]) == 1
    assert "optimizer.lr=0.003" in new[0]["overrides"] and new[0]["values"]["training.seed"] == 2
    assert new[0]["stage2"] is True


def test_best_lr_seeds_is_validated():
    with pytest.raises(SweepError, match="needs an lr axis"):
        expand({"name": "x", "axes": {"placement": ["pre"]}, "best_lr_seeds": [2]})
    with pytest.raises(SweepError, match="list of integer seeds"):
        expand({"name": "x", "axes": {"lr": [1e-3]}, "best_lr_seeds": "2"})
    with pytest.raises(SweepError, match="seed axis must come last"):
        expand({"name": "x", "axes": {"seed": [1], "lr": [1e-3]}, "best_lr_seeds": [2]})


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    pkg = tmp_path / "entry"
    pkg.mkdir()
    (pkg / "fake_entry.py").write_text(FAKE_ENTRY)
    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg), repo, os.environ.get("PYTHONPATH", "")]))
    return "fake_entry:main"


def _calls(runs: Path) -> list[tuple[str, str]]:
    path = runs / "calls.txt"
    return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_stage_sweep_in_workers_then_resume(tmp_path, fake_entry):
    runs = tmp_path / "runs"
    lines: list[str] = []
    code, results = run_local(
        expand(SWEEP), runs, jobs=2, in_process=True, worker_entry=fake_entry, echo=lines.append
    )
    assert code == 0, lines
    names = [r.name for r in results]
    # Grid (6) + seeds 2, 3 at pre's best LR (3e-3) and post's (1e-3).
    assert sorted(names[6:]) == sorted(
        ["pre-L2-lr0.003-s2", "pre-L2-lr0.003-s3", "post-L2-lr0.001-s2", "post-L2-lr0.001-s3"]
    )
    calls = _calls(runs)
    assert len(calls) == 10
    # Two workers ran the ten cells: at most two pids, and some pid ran more than one cell.
    pids = {pid for pid, _ in calls}
    assert 1 <= len(pids) <= 2 and len(calls) > len(pids)
    frozen = json.loads((runs / FROZEN).read_text())
    assert len(frozen["cells"]) == 10 and sum(bool(c.get("stage2")) for c in frozen["cells"]) == 4
    assert "training pre-L2-lr0.003-s2" in (runs / "pre-L2-lr0.003-s2" / "sweep-cell.log").read_text()
    assert lines[-1].startswith("sweep two-stage: 9 completed, 1 diverged of 10 cells")

    # Resume: nothing is redone, with two jobs again; the best LRs (and so the cells) are the same.
    lines.clear()
    code, results = run_local(
        expand(SWEEP), runs, jobs=2, in_process=True, worker_entry=fake_entry, echo=lines.append
    )
    assert code == 0 and len(_calls(runs)) == 10
    assert sum("skipped (" in line for line in lines) == 10


def test_resume_runs_only_unfinished_cells_and_a_crash_fails_one_cell(tmp_path, fake_entry):
    runs = tmp_path / "runs"
    _summary(runs / "pre-L2-lr0.001-s1", "completed", 4.0)
    _summary(runs / "pre-L2-lr0.003-s1", "completed", 3.5)
    _summary(runs / "pre-L2-lr0.01-s1", "completed", 3.8)
    _summary(runs / "pre-L2-lr0.003-s2", "completed", 3.52)
    (runs / "crash").write_text("post-L2-lr0.001-s1")
    code, results = run_local(
        expand(SWEEP), runs, jobs=2, in_process=True, worker_entry=fake_entry, echo=lambda _: None
    )
    status = {r.name: r.status for r in results}
    assert code == 1 and status["post-L2-lr0.001-s1"] == "failed"
    # The crashed worker was replaced: the other unfinished cells ran; post's group has no best LR
    # yet (its grid is incomplete), pre's got its missing seed 3 only.
    ran = [name for _, name in _calls(runs)]
    assert sorted(ran) == sorted(
        ["post-L2-lr0.001-s1", "post-L2-lr0.003-s1", "post-L2-lr0.01-s1", "pre-L2-lr0.003-s3"]
    )
    assert status["post-L2-lr0.003-s1"] == "completed"
    # A plain rerun leaves the failed cell alone (shown as failed: a cell that fails at every start
    # is not started again by every rerun), so post's grid stays incomplete.
    code, results = run_local(
        expand(SWEEP), runs, jobs=2, in_process=True, worker_entry=fake_entry, echo=lambda _: None
    )
    assert code == 1 and len(_calls(runs)) == 4
    assert {r.name: r.status for r in results}["post-L2-lr0.001-s1"].startswith("failed")
    # --retry-failed: only the crashed cell and then post's stage 2.
    code, _ = run_local(
        expand(SWEEP),
        runs,
        jobs=2,
        in_process=True,
        worker_entry=fake_entry,
        echo=lambda _: None,
        retry_failed=True,
    )
    assert code == 0
    assert sorted(name for _, name in _calls(runs)[4:]) == sorted(
        ["post-L2-lr0.001-s1", "post-L2-lr0.001-s2", "post-L2-lr0.001-s3"]
    )


def test_in_process_refuses_multi_process_cells(tmp_path):
    with pytest.raises(SweepError, match="--isolate"):
        run_local(expand(SWEEP), tmp_path, in_process=True, nproc=2, python=sys.executable)


def test_stage2_seeds_run_before_the_rest_of_the_grid(tmp_path, fake_entry):
    # One job: pre's grid, then pre's seeds at its best LR, then post's grid and seeds. A sweep
    # stopped half-way holds complete groups.
    runs = tmp_path / "runs"
    code, _ = run_local(
        expand(SWEEP), runs, jobs=1, in_process=True, worker_entry=fake_entry, echo=lambda _: None
    )
    assert code == 0
    assert [name for _, name in _calls(runs)] == [
        "pre-L2-lr0.001-s1",
        "pre-L2-lr0.003-s1",
        "pre-L2-lr0.01-s1",
        "pre-L2-lr0.003-s2",
        "pre-L2-lr0.003-s3",
        "post-L2-lr0.001-s1",
        "post-L2-lr0.003-s1",
        "post-L2-lr0.01-s1",
        "post-L2-lr0.001-s2",
        "post-L2-lr0.001-s3",
    ]


def test_shipped_lr_sweeps_follow_the_protocol():
    from megaspan.config import load_config, validate
    from megaspan.config.capabilities import Capabilities
    from megaspan.sweep import load_sweep

    proxy = load_sweep("cpu-proxy")
    values = [c["values"] for c in proxy["cells"]]
    labels = {v["model.norm_placement"] for v in values}
    assert labels == {
        "pre",
        "post",
        "spannorm",
        "spannorm-attn",
        "b2t",
        "hybridnorm",
        "hybridnorm_star",
        "deepnorm",
        "mixln",
        "lns",
        "peri",
    }
    assert {v["model.num_layers"] for v in values} == {6, 24}
    lrs = sorted({v["optimizer.lr"] for v in values})
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert len(lrs) >= 5 and max(ratios) / min(ratios) < 1.02  # log-spaced
    assert len(proxy["best_lr_seeds"]) >= 2 and {v["training.seed"] for v in values} == {1}  # >= 3 seeds
    # Every cell is a valid CPU config (a typo in a key would fail here, not an hour into the sweep).
    for cell in proxy["cells"]:
        validate(load_config(proxy["config"], cell["overrides"]), 1, Capabilities.cpu())
    steps = int(
        next(o for o in proxy["cells"][0]["overrides"] if o.startswith("training.steps=")).split("=")[1]
    )
    interval = int(
        next(o for o in proxy["cells"][0]["overrides"] if o.startswith("training.eval_interval=")).split("=")[
            1
        ]
    )
    assert steps % interval == 0 and (steps // 2) % interval == 0  # N and N/2 are evaluation steps

    h100 = load_sweep("paper-h100")
    assert len({c["values"]["optimizer.lr"] for c in h100["cells"]}) >= 3 and h100["best_lr_seeds"]


def test_ctrl_c_ends_the_workers_and_resume_finishes(tmp_path, fake_entry):
    # Ctrl-C reaches the runner while the workers' cells finish normally: each worker then reads
    # its stdin for the next cell, so the runner must close it before waiting (it hung before).
    import signal

    # Also when SIGINT was inherited ignored (pytest started with `&` from a script: the full
    # suite failed here that way): the runner makes Ctrl-C stop the sweep anyway, and puts the
    # inherited disposition back when it returns.
    inherited = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _ctrl_c_then_resume(tmp_path, fake_entry)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def _ctrl_c_then_resume(tmp_path, fake_entry):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "interrupt").write_text("pre-L2-lr0.003-s1")
    lines: list[str] = []
    code, results = run_local(
        expand(SWEEP), runs, jobs=2, in_process=True, worker_entry=fake_entry, echo=lines.append
    )
    assert code == 130 and any("interrupted" in line for line in lines)
    assert len(_calls(runs)) < 10
    (runs / "interrupt").unlink()
    code, results = run_local(
        expand(SWEEP), runs, jobs=2, in_process=True, worker_entry=fake_entry, echo=lambda _: None
    )
    assert code == 0 and len(results) == 10
    ran = [name for _, name in _calls(runs)]
    assert len(ran) == len(set(ran)) == 10  # nothing ran twice

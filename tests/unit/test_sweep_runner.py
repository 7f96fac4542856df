"""The local sweep runner and the Slurm submitter (no cluster: the sbatch command is checked).

The runner's cell command is ``<python> -m megaspan train ... training.run_dir=DIR``; most tests
give it a stand-in interpreter that writes the summary.json a real run would, so they exercise
the runner (skip/resume logic, failures, progress lines) in milliseconds. One slow test runs real
``megaspan train`` cells.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from megaspan.sweep import expand
from megaspan.sweep.runner import CELL_LOG, FROZEN, progress_line, run_local, train_command
from megaspan.sweep.slurm import array_spec, submit
from megaspan.sweep.spec import SweepError

SWEEP = {
    "name": "demo",
    "config": "tiny",
    "fixed": {"training.steps": 4},
    "axes": {"placement": ["pre", "post"], "depth": [2, 4], "seed": [1]},
}

# A stand-in for `python -m megaspan train`: records its argv, then ends the run the way the cell's
# placement says (post at depth 4 diverges, pre at depth 4 crashes without a summary).
FAKE = r"""#!{python}
import json, sys
from pathlib import Path
args = sys.argv[1:]
run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("training.run_dir=")))
run_dir.mkdir(parents=True, exist_ok=True)
with open(run_dir.parent / "calls.txt", "a") as f:
    f.write(" ".join(args) + "\n")
name = run_dir.name
if name == "pre-L4-s1" and not (run_dir.parent / "fixed").exists():
    sys.exit(1)
status = "diverged" if name == "post-L4-s1" else "completed"
(run_dir / "summary.json").write_text(json.dumps({{"status": status, "final_val_loss": 3.5,
                                                   "final_train_loss": 3.6}}))
sys.exit(3 if status == "diverged" else 0)
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "fake-python"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _calls(runs: Path) -> list[str]:
    path = runs / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_train_command_order():
    sweep = expand(SWEEP)
    cmd = train_command(sweep, 1, Path("/r/pre-L4-s1"), extra=["training.steps=2"], python="py")
    assert cmd == [
        "py",
        "-m",
        "megaspan",
        "train",
        "--config",
        "tiny",
        "checkpoint.resume=auto",
        "logging.wandb.group=demo",
        "logging.wandb.name=pre-L4-s1",
        'logging.wandb.tags=["placement:pre","depth:4","seed:1"]',
        "training.steps=4",
        "model.norm_placement=pre",
        "model.num_layers=4",
        "training.seed=1",
        "training.steps=2",
        "training.run_dir=/r/pre-L4-s1",
    ]
    cmd = train_command(sweep, 0, Path("/r/x"), nproc=2, python="py")
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]


def test_runner_skips_finished_cells_and_reruns_the_rest(tmp_path, fake_python):
    runs = tmp_path / "runs"
    lines: list[str] = []
    code, results = run_local(expand(SWEEP), runs, python=fake_python, echo=lines.append)
    assert code == 1  # pre-L4 failed
    assert {r.name: r.status for r in results} == {
        "pre-L2-s1": "completed",
        "pre-L4-s1": "failed",
        "post-L2-s1": "completed",
        "post-L4-s1": "diverged",
    }
    assert len(_calls(runs)) == 4
    assert json.loads((runs / FROZEN).read_text())["name"] == "demo"
    assert (runs / "pre-L4-s1" / CELL_LOG).read_text().startswith("$ ")
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split()[0] for line in progress] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "pre-L4-s1 | failed (exit 1) | loss -" in progress[1]
    assert "post-L4-s1 | diverged | val loss 3.5000" in progress[3]
    assert all("sweep ETA" in line for line in progress)

    # Second run: the failed cell is not started again (it used to be, at every run of the sweep,
    # as "incomplete"): it shows as failed with its exit code, and the sweep still exits 1.
    (runs / "fixed").touch()
    lines.clear()
    code, results = run_local(expand(SWEEP), runs, python=fake_python, echo=lines.append)
    assert code == 1 and len(_calls(runs)) == 4
    assert any("pre-L4-s1 | skipped (failed (exit 1))" in line for line in lines), lines
    from megaspan.report.collect import collect

    assert {r.name: r.status for r in collect([runs])}["pre-L4-s1"] == "failed (exit 1)"

    # Third run, asked to retry failed cells: completed and diverged cells are skipped; only the
    # failed cell runs again.
    lines.clear()
    code, results = run_local(expand(SWEEP), runs, python=fake_python, echo=lines.append, retry_failed=True)
    assert code == 0
    calls = _calls(runs)
    assert len(calls) == 5 and "training.run_dir=" + str(runs / "pre-L4-s1") in calls[-1]
    assert "checkpoint.resume=auto" in calls[-1]
    assert sum("skipped (" in line for line in lines) == 3


def test_preempted_cell_is_resumed(tmp_path, fake_python):
    runs = tmp_path / "runs"
    (runs / "pre-L2-s1").mkdir(parents=True)
    (runs / "pre-L2-s1" / "summary.json").write_text(json.dumps({"status": "preempted"}))
    for name in ("pre-L4-s1", "post-L2-s1", "post-L4-s1"):
        (runs / name).mkdir()
        (runs / name / "summary.json").write_text(json.dumps({"status": "completed"}))
    code, results = run_local(expand(SWEEP), runs, python=fake_python, echo=lambda _: None)
    assert code == 0
    assert [c.split("training.run_dir=")[1] for c in _calls(runs)] == [str(runs / "pre-L2-s1")]


def test_missing_or_broken_summary_means_not_finished(tmp_path, fake_python):
    runs = tmp_path / "runs"
    for name in ("pre-L2-s1", "post-L2-s1", "post-L4-s1"):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"status": "completed"}))
    (runs / "pre-L4-s1").mkdir()
    (runs / "pre-L4-s1" / "summary.json").write_text("{torn")
    (runs / "fixed").touch()
    run_local(expand(SWEEP), runs, python=fake_python, echo=lambda _: None)
    assert len(_calls(runs)) == 1


def test_parallel_jobs(tmp_path, fake_python):
    runs = tmp_path / "runs"
    (runs).mkdir()
    (runs / "fixed").touch()
    code, results = run_local(expand(SWEEP), runs, jobs=3, python=fake_python, echo=lambda _: None)
    assert code == 0 and len(results) == 4 and len(_calls(runs)) == 4
    with pytest.raises(SweepError, match="--jobs"):
        run_local(expand(SWEEP), runs, jobs=0, python=fake_python)


def test_progress_line_format():
    from megaspan.sweep.runner import CellResult

    line = progress_line(
        3, 10, CellResult(2, "spannorm-L24", "completed", 3.21, "val", 75.0, 0, False), 610.0
    )
    assert line == "[3/10] spannorm-L24 | completed | val loss 3.2100 | 1m15s | sweep ETA 10m10s"


def test_array_spec():
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_spec([3], 2) == "3%2"


def test_slurm_submits_only_unfinished_cells(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    (runs / "pre-L2-s1").mkdir(parents=True)
    (runs / "pre-L2-s1" / "summary.json").write_text(json.dumps({"status": "completed"}))
    cmd, job, pending = submit(
        expand(SWEEP),
        runs,
        extra=["training.steps=2"],
        sbatch_args=["--gpus-per-node=8"],
        array_limit=2,
        dry_run=True,
    )
    assert job is None and pending == [1, 2, 3]
    assert cmd[:3] == ["sbatch", "--parsable", "--array=1-3%2"]
    assert "--gpus-per-node=8" in cmd
    assert cmd[-3].endswith("launch/slurm/sweep.sbatch") and cmd[-1] == "training.steps=2"

    # A real submission through a stand-in sbatch on PATH: freezes the cells and passes the dirs.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(
        '#!/bin/sh\nenv | grep ^MEGASPAN_ > "$MEGASPAN_SWEEP_DIR/env.txt"\n'
        'echo "$@" > "$MEGASPAN_SWEEP_DIR/args.txt"\necho 4242\n'
    )
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cmd, job, pending = submit(expand(SWEEP), runs)
    assert job == "4242"
    env = (runs / "env.txt").read_text()
    assert f"MEGASPAN_SWEEP_DIR={runs.resolve()}" in env
    frozen = Path(cmd[-1])
    assert frozen.parent == runs.resolve() and len(json.loads(frozen.read_text())["cells"]) == 4


@pytest.mark.integration  # runs the generated sbatch script: a Megatron-importing subprocess
def test_sbatch_script_resolves_the_cell_through_the_package(tmp_path):
    """sweep.sbatch's cell lookup + run dir, with train.sbatch replaced by an echo (no cluster)."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    home = tmp_path / "home"
    (home / "launch" / "slurm").mkdir(parents=True)
    shutil.copy(repo / "launch" / "slurm" / "sweep.sbatch", home / "launch" / "slurm")
    (home / "launch" / "slurm" / "train.sbatch").write_text('printf "%s\\n" "$@"\n')
    shutil.copytree(repo / "megaspan" / "sweep", home / "megaspan" / "sweep")
    shutil.copy(repo / "megaspan" / "__init__.py", home / "megaspan")
    shutil.copy(repo / "megaspan" / "errors.py", home / "megaspan")
    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps(expand(SWEEP)))
    env = dict(
        os.environ,
        SLURM_ARRAY_TASK_ID="3",
        MEGASPAN_HOME=str(home),
        MEGASPAN_PYTHON=sys.executable,
        MEGASPAN_SWEEP_DIR=str(tmp_path / "sweepdir"),
    )
    proc = subprocess.run(
        ["bash", str(home / "launch" / "slurm" / "sweep.sbatch"), str(sweep_file), "x.y=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()[1:]
    assert args[:2] == ["--config", "tiny"] and "model.norm_placement=post" in args
    assert args[-2:] == ["x.y=1", f"training.run_dir={tmp_path / 'sweepdir'}/post-L4-s1"]


def test_cli_sweep_list_and_errors(tmp_path, capsys):
    from megaspan.cli import main

    assert main(["sweep", "cpu-small", "--list", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "spannorm-attn-L24-lr0.01-s2" in out and "pending" in out
    assert main(["sweep", "no-such-sweep"]) == 2
    assert "megaspan: error: sweep file 'no-such-sweep' not found" in capsys.readouterr().err
    assert main(["sweep", "cpu-small", "notanoverride", "--runs", str(tmp_path)]) == 2
    capsys.readouterr()


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("config: tiny\naxes:\n  seed: [1]\n", ["--jobs", "0"], "--jobs must be >= 1, got 0"),
        ("config: tiny\naxes:\n  seed: [1]\n", ["--nproc", "-1"], "--nproc must be >= 1, got -1"),
        (
            "config: tiny\naxes:\n  seed: [1]\n  model.not_a_key: [1]\n",
            [],
            "unknown config key 'model.not_a_key'",
        ),
        ("config: no-such-recipe\naxes:\n  seed: [1]\n", [], "config file 'no-such-recipe' not found"),
        ("config: tiny\naxes:\n  seed: []\n", [], "axis 'seed' has no values"),
    ],
)
def test_sweep_list_refuses_a_broken_sweep(tmp_path, capsys, text, args, message):
    """issue 20 item 10: --list accepted unknown keys, a missing recipe, --jobs 0, --nproc -1, and an
    empty axis made a cell named '__'."""
    from megaspan.cli import main

    (tmp_path / "s.yaml").write_text("name: s\n" + text)
    assert main(["sweep", str(tmp_path / "s.yaml"), "--list", "--runs", str(tmp_path / "runs"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_real_cells_then_resume(tmp_path, monkeypatch):
    """Two real `megaspan train` cells; the second invocation skips both (summary.json written by
    the trainer) or, for a trainer without summaries, resumes from the final checkpoint."""
    monkeypatch.setenv("MEGASPAN_CACHE_DIR", str(tmp_path / "cache"))
    sweep = expand(
        {
            "name": "real",
            "config": "tiny",
            "fixed": {
                "training.steps": 2,
                "training.eval_interval": 2,
                "training.eval_steps": 1,
                "schedule.warmup_steps": 1,
                "logging.diagnostics_interval": 1,
            },
            "axes": {"placement": ["pre", "post"], "depth": [2]},
        }
    )
    runs = tmp_path / "runs"
    lines: list[str] = []
    code, results = run_local(sweep, runs, echo=lines.append)
    assert code == 0, [(r.name, (runs / r.name / CELL_LOG).read_text()[-2000:]) for r in results]
    assert [r.status for r in results] == ["completed", "completed"]
    assert all((runs / r.name / "config.yaml").is_file() for r in results)
    code, results = run_local(sweep, runs, echo=lines.append)
    assert code == 0

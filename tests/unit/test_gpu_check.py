"""``tools/gpu_check.sh``: the driver's judgement (grouping, comparison, planning) on CPU, and its
training-run phase end to end with CPU processes standing in for GPUs (GPU_CHECK_ON_CPU=1).

What only a GPU node can show (TE, FP8, NCCL) is in tests/gpu, which the driver runs there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses resolve their module by name
_spec.loader.exec_module(gc)


def _cpu_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, BENCH="0", **extra)
    return env


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_gpu_train" name="test_te_trains[pre-bf16]"/>
<testcase classname="tests.gpu.test_gpu_train" name="test_te_trains[post-bf16]">
  <failure message="AssertionError: [nan, nan]">trace</failure></testcase>
<testcase classname="tests.gpu.test_gpu_train" name="test_te_trains[pre-fp8-delayed]">
  <skipped type="pytest.skip" message="needs CUDA and Transformer Engine"/></testcase>
<testcase classname="tests.gpu.test_gpu_train" name="test_te_trains[pre-fp8-tensorwise]"/>
<testcase classname="tests.gpu.test_gpu_train" name="test_te_trains[post-fp8-tensorwise]">
  <skipped type="pytest.skip" message="x"/></testcase>
<testcase classname="tests.gpu.test_new" name="test_something_new">
  <error message="fixture 'gpu' not found"/></testcase>
</testsuite></testsuites>
"""


def test_grouping_gives_pass_fail_skip_miss_and_claims_every_test(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    results = {r.name: r for r in gc.group_outcomes(gc.parse_junit(path))}
    assert results["te-train-bf16"].status == gc.FAIL
    assert "test_te_trains[post-bf16]" in results["te-train-bf16"].detail
    assert "[nan, nan]" in results["te-train-bf16"].detail
    # fp8-delayed must not swallow fp8-tensorwise ids or the other way round
    assert results["te-train-fp8-delayed"].status == gc.SKIP
    assert results["te-train-fp8-delayed"].detail == "needs CUDA and Transformer Engine"
    assert results["te-train-fp8-tensorwise"].status == gc.PASS
    assert results["te-train-fp8-tensorwise"].detail.startswith("1 passed, 1 skipped")
    assert results["fp8-delayed-resume"].status == gc.MISS  # none of its tests ran
    assert results[gc.OTHER].status == gc.FAIL  # an unclaimed test still counts
    assert "test_something_new" in results[gc.OTHER].detail


@pytest.mark.integration  # collects tests/gpu in a fresh pytest (~10 s of imports)
def test_every_gpu_test_belongs_to_exactly_one_check(tmp_path):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/gpu", "-p", "no:randomly", f"--junitxml={junit}"],
        cwd=ROOT,
        env=_cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    outcomes = gc.parse_junit(junit)
    assert len(outcomes) > 50
    for test_id in outcomes:
        owners = [g.name for g in gc.TEST_GROUPS if re.search(g.pattern, test_id)]
        assert len(owners) == 1, (test_id, owners)
    # On a CPU machine every check skips, each with the marker's reason.
    results = gc.group_outcomes(outcomes)
    assert [r.name for r in results] == [g.name for g in gc.TEST_GROUPS]
    assert {r.status for r in results} == {gc.SKIP}
    assert {r.detail for r in results} <= {"needs CUDA", "needs CUDA and Transformer Engine"}


def test_loss_lines_parse_from_the_console_format():
    text = (
        "megaspan train: spannorm GPT ...\n"
        "step 1/4 | loss 6.241164 | lr 3.0000e-03 | grad_norm 0.6200 | tokens/s 12995 | 25% [#####]\n"
        "saved checkpoint x\n"
        "step 2/4 | loss nan | lr 2.3e-03\n"
        "step 2/4 | loss 1.0 | lr 2.3e-03\n"  # a second rank's copy: the first wins
        "valid loss 6.1 | ppl 444 | step 4\n"
    )
    losses = gc.parse_losses(text)
    assert list(losses) == [1, 2]
    assert losses[1] == 6.241164
    assert losses[2] != losses[2]  # nan kept, so the comparison can fail on it


def test_compare_losses_passes_within_tolerance_only():
    ref = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}
    ok, text = gc.compare_losses(ref, {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0001}, rtol=1e-4)
    assert ok and "5.0e-05" in text and "step 4" in text
    ok, text = gc.compare_losses(ref, {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.001}, rtol=1e-4)
    assert not ok and "5.0e-04" in text
    ok, text = gc.compare_losses(ref, {1: 5.0, 2: 4.0, 3: 3.0}, rtol=1e-4)
    assert not ok and "[4]" in text
    ok, text = gc.compare_losses(ref, {1: 5.0, 2: float("nan"), 3: 3.0, 4: 2.0}, rtol=1.0)
    assert not ok and "step 2" in text


def test_plan_fits_the_machine():
    runs, comparisons, skips = gc.plan_runs(1, False, [])
    assert [c.name for c in comparisons] == ["cpu-vs-gpu-local"]
    assert {s.name for s in skips} == {
        "cpu-vs-gpu-te",
        "layout-tp2-sp",
        "layout-pp2",
        "layout-cp2",
        "layout-ep2",
        "layout-ep2-grouped-gemm",
    }
    assert all(s.status == gc.SKIP for s in skips)
    runs, comparisons, skips = gc.plan_runs(8, True, [])
    assert skips == []
    assert {c.name for c in comparisons} == {
        "cpu-vs-gpu-local",
        "cpu-vs-gpu-te",
        "layout-tp2-sp",
        "layout-pp2",
        "layout-cp2",
        "layout-ep2",
        "layout-ep2-grouped-gemm",
    }
    by_name = {r.name: r for r in runs}
    cp2 = by_name["cp2"]
    assert cp2.nproc == 2 and "parallel.context_parallel_size=2" in cp2.overrides
    assert "model.transformer_impl=transformer_engine" in cp2.overrides
    # every compared run starts from a seed that is itself planned
    assert all(by_name[r.seed].seed is None for r in runs if r.seed)
    # ONLY keeps a comparison's runs and their seeds, nothing else
    runs, comparisons, skips = gc.plan_runs(8, True, ["layout-ep2"])
    assert {c.name for c in comparisons} == {"layout-ep2", "layout-ep2-grouped-gemm"}
    assert {r.name for r in runs} == {"seed-moe", "ref-moe", "ep2", "ref-moe-gg", "ep2-gg"}


def test_the_resumed_runs_start_from_the_seed_with_a_fresh_optimizer(tmp_path):
    run = gc.Run("pp2", ("parallel.pipeline_model_parallel_size=2",), nproc=2, seed="seed")
    cmd = gc.train_command(run, "py", tmp_path / "pp2", tmp_path / "seed" / "checkpoints" / "step_0000008")
    assert cmd[:4] == ["py", "-m", "torch.distributed.run", "--standalone"]
    assert f"checkpoint.resume={tmp_path}/seed/checkpoints/step_0000008" in cmd
    assert "checkpoint.load_optimizer=false" in cmd and f"training.steps={gc.STEPS}" in cmd
    seed = gc.train_command(gc.Run("seed", ()), "py", tmp_path / "seed", None)
    assert seed[:3] == ["py", "-m", "megaspan"] and f"training.steps={gc.SEED_STEPS}" in seed
    assert "checkpoint.resume=none" in seed


def test_without_cuda_it_says_skip_and_exits_0(tmp_path):
    proc = subprocess.run(
        [str(SCRIPT)], env=_cpu_env(OUT=str(tmp_path / "out")), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SKIP  gpu_check") and "no CUDA device" in proc.stdout


@pytest.mark.integration  # 3 CLI training runs of the tiny model (~40 s on 2 cores)
def test_training_phase_end_to_end_on_cpu(tmp_path):
    """The whole phase-2 path: a seed run, resumed runs (torchrun for PP2), log parsing, judgement.
    (The CPU-vs-GPU pair differs only in CUDA_VISIBLE_DEVICES, which this machine cannot vary.)"""
    out = tmp_path / "out"
    env = _cpu_env(
        GPU_CHECK_ON_CPU="1",
        ONLY="layout-pp2",
        OUT=str(out),
        MEGASPAN_CACHE_DIR=str(tmp_path / "cache"),
        HOME=str(tmp_path / "home"),
    )
    (tmp_path / "home").mkdir()
    proc = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    status = {r["name"]: r["status"] for r in summary["results"]}
    assert status == {"layout-pp2": "PASS"}, proc.stdout
    losses = json.loads((out / "losses.json").read_text())
    assert set(losses) == {"seed", "ref", "pp2"}
    assert [int(s) for s in losses["seed"]] == list(range(1, gc.SEED_STEPS + 1))
    # the compared runs start from a trained model, not from initialisation
    assert losses["ref"]["1"] < losses["seed"]["1"] - 0.1
    assert "PASS  layout-pp2" in proc.stdout


@pytest.mark.integration
def test_a_run_that_dies_is_a_miss_and_fails_the_check(tmp_path):
    out = tmp_path / "out"
    env = _cpu_env(GPU_CHECK_ON_CPU="1", ONLY="cpu-vs-gpu-local", OUT=str(out), GPU_CHECK_TIMEOUT="1")
    proc = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "MISS  cpu-vs-gpu-local" in proc.stdout
    assert "timed out after 1 s" in proc.stdout

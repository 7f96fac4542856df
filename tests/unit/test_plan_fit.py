"""``megaspan plan`` against device memory: stages over the budget are marked and the smallest
TP/PP/EP change that fits is suggested (the plan runs in this process after its own process group
is torn down: it creates fake ones; tests.helpers.cli.run_plan)."""

from __future__ import annotations

import json

import pytest

from megaspan.errors import ConfigError
from megaspan.plan.fit import GIB, device_memory, parse_memory
from tests.helpers.cli import run_plan_args

# Every test here runs `megaspan plan` (torch and Megatron, fake process groups).
pytestmark = pytest.mark.integration

DENSE = [
    "model.norm_placement=pre",
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_attention_heads=4",
    "model.seq_length=128",
    "model.vocab_size=1024",
    "training.micro_batch_size=1",
    "training.global_batch_size=8",
]


def _plan(*args: str) -> dict:
    out = run_plan_args("--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_memory_sizes_and_gpu_types():
    assert parse_memory("80GiB") == 80 * GIB
    assert parse_memory("80GB") == 80e9
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("2") == 2 * GIB
    assert device_memory("h100", None)[0] == pytest.approx(79.6 * GIB)
    assert device_memory(None, "40GiB")[0] == 40 * GIB
    with pytest.raises(ConfigError, match="unknown GPU type"):
        device_memory("K80", None)
    with pytest.raises(ConfigError, match="expected a size"):
        parse_memory("eighty")


def test_over_budget_stage_is_marked_and_a_tp_change_suggested():
    roomy = _plan("--world-size", "2", *DENSE)
    assert roomy["fit"]["over"] == []
    need = roomy["stages"][0]["memory"]["total"]
    # A device just too small for TP1 (after the 90 % headroom) but large enough for TP2.
    tight = f"{need / 0.9 * 0.8 / 2**20:.0f}MiB"
    result = _plan("--world-size", "2", "--gpu-memory", tight, *DENSE)
    fit = result["fit"]
    assert [stage for stage, _ in fit["over"]] == [0]
    assert fit["suggestion"] == "parallel.tensor_model_parallel_size=2"
    assert fit["suggestion_peak"] <= fit["budget"]

"""``megaspan plan``: per-GPU parameter counts of large layouts, without GPUs.

The plan runs in this process after the test's own gloo group is torn down (it creates fake
process groups; tests.helpers.cli.run_plan), except the table test, which runs the real command
in a new interpreter. Its per-stage counts come from sharded meta-device builds; they must
add up to a model built for real at TP=PP=EP=1 in this process, and for the 512-GPU layout to an
analytical count.
"""

from __future__ import annotations

import time

import pytest

from megaspan.config import load_config
from tests.helpers.cli import PLAN_TIMEOUT_S, plan_json, run_plan
from tests.helpers.models import SMALL_MOE

# Every test here runs `megaspan plan` (torch, Megatron, fake process groups).
pytestmark = pytest.mark.integration

# 512 GPUs: TP8 x PP8 x EP8 (x DP8), a 64-layer, 64-expert model (~217B parameters).
LARGE = [
    "model.norm_placement=pre",
    "model.num_layers=64",
    "model.hidden_size=8192",
    "model.num_attention_heads=64",
    "model.num_query_groups=8",
    "model.moe.num_experts=64",
    "model.moe.router_topk=4",
    "model.moe.ffn_hidden_size=2048",
    "model.seq_length=4096",
    "model.vocab_size=128000",
    "parallel.tensor_model_parallel_size=8",
    "parallel.sequence_parallel=true",
    "parallel.pipeline_model_parallel_size=8",
    "parallel.expert_model_parallel_size=8",
    "parallel.use_distributed_optimizer=true",
    "training.micro_batch_size=1",
    "training.global_batch_size=512",
]


def real_single_device_count(overrides: list[str]) -> int:
    """Parameters of the model built for real (CPU tensors) at TP=PP=EP=1."""
    from megaspan.models import build_model

    cfg = load_config(None, overrides)
    return sum(
        p.numel() for chunk in build_model(cfg, cfg.model.vocab_size).chunks for p in chunk.parameters()
    )


@pytest.mark.parametrize(
    "placement,layout,world",
    [
        (
            "spannorm",
            [
                "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true",
                "parallel.pipeline_model_parallel_size=2",
                "parallel.expert_model_parallel_size=2",
            ],
            8,
        ),
        (
            "hybridnorm",
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "parallel.expert_model_parallel_size=4",
            ],
            8,
        ),
        (
            "b2t",
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.num_layers_in_first_pipeline_stage=1",
                "parallel.num_layers_in_last_pipeline_stage=3",
                "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true",
                "parallel.expert_tensor_parallel_size=1",
                "parallel.expert_model_parallel_size=4",
            ],
            8,
        ),
    ],
    ids=["tp2-pp2-ep2", "pp2-vpp2-ep4", "uneven-pp2-tp2-etp1-ep4"],
)
def test_shards_add_up_to_the_real_single_device_model(mcore, placement, layout, world):
    overrides = SMALL_MOE + [f"model.norm_placement={placement}"]
    expected = real_single_device_count(overrides)  # first: the plan tears this process's group down
    plan = plan_json(world, overrides + layout)
    assert plan["sharded_total"] == expected
    assert plan["single_device_params"] == expected
    layers = sorted(n for stage in plan["stages"] for n in stage["shard"]["layers"])
    assert layers == [1, 2, 3, 4]  # every layer on exactly one stage


def _analytical_pre_moe_count(cfg) -> int:
    """Pre-LN MoE GPT with RMSNorm, SwiGLU experts, GQA, no biases, tied embeddings."""
    m = cfg.model
    h, kv = m.hidden_size, m.num_query_groups * (m.hidden_size // m.num_attention_heads)
    attention = h * (h + 2 * kv) + h * h + h  # qkv, proj, fused input norm
    experts = m.moe.num_experts * (h * 2 * m.moe.ffn_hidden_size + m.moe.ffn_hidden_size * h)
    moe = h * m.moe.num_experts + experts + h  # router, experts, pre-MLP norm
    return m.vocab_size * h + m.num_layers * (attention + moe) + h  # + final norm


def test_plan_512_gpus_in_seconds_adds_up():
    start = time.perf_counter()
    plan = plan_json(512, LARGE)
    elapsed = time.perf_counter() - start
    print(f"megaspan plan, 512 GPUs: {elapsed:.1f}s")
    total = _analytical_pre_moe_count(load_config(None, LARGE))
    assert plan["single_device_params"] == total
    assert plan["sharded_total"] == total
    layout = plan["layout"]
    assert (layout["tp"], layout["pp"], layout["ep"], layout["dp"], layout["expert_dp"]) == (8, 8, 8, 8, 1)
    stages = plan["stages"]
    assert [s["rank"] for s in stages] == [64 * i for i in range(8)]
    assert [s["shard"]["layers"] for s in stages] == [list(range(8 * i + 1, 8 * i + 9)) for i in range(8)]
    # Each GPU holds 1/8 of its stage's experts' (1/8-TP-sharded) weights: 64/8 experts x 8 layers.
    expert_per_gpu = 8 * (64 // 8) * 3 * 8192 * 2048 // 8
    assert all(s["shard"]["expert"] == expert_per_gpu for s in stages)
    # The embedding (first stage) and the tied output copy (last stage) make the ends heavier.
    assert stages[0]["shard"]["dense"] > stages[1]["shard"]["dense"] < stages[-1]["shard"]["dense"]
    assert all(0 < s["memory"]["total"] < 80 * 1024**3 for s in stages)
    assert elapsed < PLAN_TIMEOUT_S


def test_plan_prints_a_table():
    result = run_plan(
        8,
        SMALL_MOE + ["parallel.pipeline_model_parallel_size=2", "parallel.expert_model_parallel_size=2"],
        fresh_process=True,  # the command as a user runs it, once in this module
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("layout: 8 GPUs = TP1 x PP2 x CP1 x DP4; experts: EP2")
    assert "sum over distinct shards" in out and " == single-device build " in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2


def test_plan_rejects_a_bad_layout_in_one_line():
    result = run_plan(6, ["parallel.tensor_model_parallel_size=4"])
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("megaspan: error: world size 6 is not divisible by TP*PP*CP")
    )
    assert len(result.stderr.strip().splitlines()) == 1

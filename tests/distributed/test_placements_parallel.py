"""Placements under tensor and pipeline parallelism with real gloo process groups."""

from __future__ import annotations

import math

import pytest
import torch

from megaspan.norms import available
from tests.helpers import workers

pytestmark = [pytest.mark.distributed, pytest.mark.integration]
# ~1-2 s per case on an idle 2-core machine, 20 cases, plus the pool's start; ~5x margin.
TIMEOUT_S = 240

CASES = [(p, moe) for p in available() for moe in (False, True)]


@pytest.fixture(scope="module")
def tp1(dist_pool):
    return dist_pool(1).run(workers.loss_and_grads, 1, CASES, timeout=TIMEOUT_S)[0]


@pytest.fixture(scope="module")
def tp2(dist_pool):
    return dist_pool(2).run(workers.loss_and_grads, 2, CASES, timeout=TIMEOUT_S)


@pytest.mark.parametrize("placement,moe", CASES, ids=[f"{p}-{'moe' if m else 'dense'}" for p, m in CASES])
def test_tp2_sp_equals_tp1(tp1, tp2, placement, moe):
    """TP=2 with sequence parallelism: same loss and (gathered) gradients as TP=1."""
    loss1, grads1 = tp1[(placement, moe)]
    loss_r0, grads2 = tp2[0][(placement, moe)]
    loss_r1, _ = tp2[1][(placement, moe)]
    assert loss_r0 == loss_r1
    assert loss_r0 == pytest.approx(loss1, rel=1e-5)
    assert grads1.keys() == grads2.keys()
    scale = max(g.abs().max().item() for g in grads1.values())
    for name, g1 in grads1.items():
        torch.testing.assert_close(grads2[name], g1, rtol=1e-4, atol=1e-6 * scale, msg=name)


PIPELINE_CASES = {
    ("spannorm", ()): lambda layer: (layer["input_norm"] == "SPNorm") == (layer["number"] == 1),
    ("hybridnorm_star", ()): lambda layer: (layer["input_norm"] == "SPNorm") == (layer["number"] == 1),
    ("mixln", ("model.norm.mixln_alpha=0.75",)): lambda layer: (
        (layer["post_attn_norm"] == "SPNorm") == (layer["number"] <= 3)
    ),
    ("lns", ()): lambda layer: layer["scale"] == pytest.approx(1 / math.sqrt(layer["number"])),
}


@pytest.mark.parametrize("virtual", [False, True], ids=["pp2", "pp2-vpp2"])
def test_pipeline_uses_global_layer_numbers(dist_pool, virtual):
    """Mix-LN / LNS / HybridNorm* / SpanNorm block-0 rules follow the global layer number."""
    layout = ("parallel.pipeline_model_parallel_size=2",)
    if virtual:
        layout += ("parallel.virtual_pipeline_model_parallel_size=2",)
    cases = [(placement, layout + extra) for placement, extra in PIPELINE_CASES]
    ranks = dist_pool(2).run(workers.pipeline_layouts, cases, timeout=120)
    for (placement, extra), check in PIPELINE_CASES.items():
        per_rank = [r[(placement, layout + extra)] for r in ranks]
        numbers = [[layer["number"] for layer in r] for r in per_rank]
        # 4 layers: PP2 -> [1,2] [3,4]; PP2 x VPP2 -> rank0 chunks (1),(3), rank1 chunks (2),(4).
        assert numbers == ([[1, 3], [2, 4]] if virtual else [[1, 2], [3, 4]]), placement
        for layer in (layer for r in per_rank for layer in r):
            assert check(layer), (placement, layer)

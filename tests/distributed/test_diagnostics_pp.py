"""Diagnostics under PP2: every rank ends with all layers' values at their GLOBAL indices (GPT
layer numbers; for ``model.arch=hybrid`` the block numbers of the hybrid half layers)."""

from __future__ import annotations

import math

import pytest

from tests.distributed import diag_workers

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


@pytest.mark.parametrize("arch", ["gpt", "hybrid"])
def test_pp2_global_layer_indices_and_cross_stage_reduction(dist_pool, arch):
    ranks = dist_pool(2).run(diag_workers.pp2_diagnostics, arch, timeout=300)
    num_layers = ranks[0]["num_layers"]
    owners = {n: r for r, out in enumerate(ranks) for n in out["sizes"]}
    # 4 blocks on 2 stages: [1, 2] and [3, 4] -- numbers are global, not per stage.
    assert sorted(ranks[0]["sizes"]) == [1, 2] and sorted(ranks[1]["sizes"]) == [3, 4]
    if arch == "hybrid":  # hybrid layers 1-4 | 5-8, two per block
        assert [layers for out in ranks for layers in out["layers"]] == [
            (n, (n + 1) // 2) for n in range(1, 9)
        ]
    for out in ranks:
        values = out["values"]
        for n in range(1, num_layers + 1):
            attn, mlp = ranks[owners[n]]["sizes"][n]
            assert attn > 0 and mlp > 0
            # grads were set to n everywhere: ||g|| = n * sqrt(numel), whichever stage owns n.
            assert values[f"diag/grad_attn/layer_{n:03d}"] == pytest.approx(n * math.sqrt(attn))
            assert values[f"diag/grad_mlp/layer_{n:03d}"] == pytest.approx(n * math.sqrt(mlp))
            # weights scaled by (1 + n/100): the update-to-weight ratio is exactly n/100 (fp32).
            assert values[f"diag/update_attn/layer_{n:03d}"] == pytest.approx(n / 100, rel=1e-5)
            assert values[f"diag/update_mlp/layer_{n:03d}"] == pytest.approx(n / 100, rel=1e-5)

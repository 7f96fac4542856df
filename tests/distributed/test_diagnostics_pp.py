"""Diagnostics under PP2: every rank ends with all layers' values at their GLOBAL indices."""

from __future__ import annotations

import math

import pytest

from tests.distributed import diag_workers
from tests.helpers.harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def test_pp2_global_layer_indices_and_cross_stage_reduction():
    ranks = run_distributed(diag_workers.pp2_diagnostics, 2, timeout=300)
    num_layers = ranks[0]["num_layers"]
    owners = {n: r for r, out in enumerate(ranks) for n in out["sizes"]}
    # 4 layers on 2 stages: [1, 2] and [3, 4] -- layer numbers are global, not per stage.
    assert sorted(ranks[0]["sizes"]) == [1, 2] and sorted(ranks[1]["sizes"]) == [3, 4]
    for out in ranks:
        values = out["values"]
        for n in range(1, num_layers + 1):
            attn, mlp = ranks[owners[n]]["sizes"][n]
            # grads were set to n everywhere: ||g|| = n * sqrt(numel), whichever stage owns n.
            assert values[f"diag/grad_attn/layer_{n:03d}"] == pytest.approx(n * math.sqrt(attn))
            assert values[f"diag/grad_mlp/layer_{n:03d}"] == pytest.approx(n * math.sqrt(mlp))
            # weights scaled by (1 + n/100): the update-to-weight ratio is exactly n/100.
            assert values[f"diag/update_attn/layer_{n:03d}"] == pytest.approx(
                n / 100, rel=1e-5
            )  # fp32 weights
            assert values[f"diag/update_mlp/layer_{n:03d}"] == pytest.approx(
                n / 100, rel=1e-5
            )  # fp32 weights

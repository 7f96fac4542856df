"""Diagnostics are exact under EP, TP(+SP) and the distributed optimizer: every 2-rank layout
writes the per-layer numbers that a direct computation on the same model in one process gives.

What each layout checks (SpanNorm, 4 layers, 2 steps; see diag_workers for the set-up):

* ``ep2`` (MoE, EP2 x DP2): the experts are split over the ranks (each counts its own, once)
  while the router and attention are replicated (counted once, not twice); the load sums both
  replicas' tokens.
* ``tp2-sp`` (MoE, TP2 + SP, experts TP-sharded): sharded weights summed over the TP group,
  replicated ones (norms, router) not double counted; each TP rank routes its own tokens.
* ``dp2-distopt`` (dense) and ``dp2-ep2-distopt`` (MoE): after the reduce-scatter a rank's
  ``main_grad`` is reduced only inside its own shard of each bucket (elsewhere it holds local
  partial sums), so the gradient norm must come from the shards; the overlapped param gather
  leaves non-own shards stale until the next forward, so the update ratio must too.
* ``pp2`` and ``pp2-vpp2``: the stages' rows meet at global layer numbers; the probe forward for
  the relative update runs through the (interleaved) pipeline schedule.
* ``tp2``, ``tp2-sp`` and ``pp2``: the mechanism metrics (attention max logit / entropy with the heads split
  over the TP ranks, the LM head's vocab-parallel log Z, the relative update on sequence shards
  under SP) equal the one-process diagnostics' (themselves pinned to tests/unit/reference.py in
  tests/unit/test_diagnostics_mechanism.py). Only layouts with one data-parallel replica: these
  come from data-parallel rank 0's first micro-batch, which is the reference's only there.
"""

from __future__ import annotations

import pytest

from tests.distributed import diag_workers as dw
from tests.helpers.harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

OVERLAP = ("parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true")
CASES = (
    ("ep2", "moe", ()),
    ("tp2-sp", "moe", ()),
    ("dp2-distopt", "dense", ()),
    ("dp2-distopt", "dense", OVERLAP),
    ("dp2-ep2-distopt", "moe", ()),
    ("tp2", "dense", ()),
    ("pp2", "dense", ()),
    ("pp2-vpp2", "dense", ()),
)
MECH_FIELDS = ("attn_max_logit", "attn_entropy")
MODEL_FIELDS = ("lm_head_log_z", "relative_update")
PARAM_FIELDS = ("attn_grad_norm", "mlp_grad_norm", "attn_update_ratio", "mlp_update_ratio")
MOE_FIELDS = ("moe_load_cv", "moe_router_entropy")
REL = 1e-4  # the layouts' losses match one process to ~1e-6; a miscount is a factor of ~2


def _check(got: dict, want: dict, what) -> None:
    assert sorted(got) == sorted(want) == list(range(1, dw.STEPS + 1)), what
    for step, rows in want.items():
        assert sorted(got[step]) == sorted(rows), (what, step)
        for layer, row in rows.items():
            for key, value in row.items():
                where = (*what, f"step {step}", f"layer {layer}", key)
                if key == "moe_tokens_per_expert":
                    assert got[step][layer][key] == value, where
                else:
                    assert got[step][layer][key] == pytest.approx(value, rel=REL), where


def test_layouts_match_direct_one_process_computation(tmp_path):
    models = sorted({name for _, name, _ in CASES})
    ref = run_distributed(dw.reference_diagnostics, 1, str(tmp_path), models, timeout=600)[0]
    for name in models:
        direct = ref[name]["direct"]
        moe_keys = MOE_FIELDS + ("moe_tokens_per_expert",) if name == "moe" else ()
        assert all(
            set(row) == set(PARAM_FIELDS + moe_keys) for rows in direct.values() for row in rows.values()
        )
        # Sanity of the direct side: world 1 has no sharding, so diagnostics.py agrees with it.
        _check(ref[name]["diagnostics"], direct, ("tp1", name))
    runs = run_distributed(dw.layout_diagnostics, 2, str(tmp_path), CASES, timeout=900)
    for layout, name, extra in CASES:
        rows, model = runs[0][(layout, name, extra)]
        _check(rows, ref[name]["direct"], (layout, name, extra))
        assert all(m["relative_update"] is not None and m["relative_update"] > 0 for m in model.values()), (
            layout
        )
        if not layout.startswith(("tp2", "pp2")) or "vpp" in layout:  # vpp: micro-batches of 2, not 4
            continue
        one = ref[name]["diagnostics"]
        for step in one:
            for key in MODEL_FIELDS:
                want = ref[name]["model"][step][key]
                assert want is not None and model[step][key] == pytest.approx(want, rel=REL), (
                    layout,
                    step,
                    key,
                )
            for layer, row in one[step].items():
                for key in MECH_FIELDS:
                    where = (layout, name, step, layer, key)
                    assert row[key] is not None and rows[step][layer][key] == pytest.approx(
                        row[key], rel=REL
                    ), where

"""Checkpoints move between layouts: save at TP2 / PP2 / EP2 / DP2+distributed optimizer, load at 1.

1. one process builds each model and trains it 5 steps (the reference);
2. two processes load the same starting weights into a 2-way layout, train 3 steps and save the
   full state (model, optimizer, scheduler, progress) through megaspan's checkpoint code;
3. one process loads every checkpoint twice:
   * weights only (``checkpoint.load_optimizer=false``): the validation loss equals the one the
     saving layout measured on the same weights;
   * full state (the default): the Adam moments (every parameter, gathered to full tensors), Adam's
     step counts and the LR scheduler's state and current LR equal the saving run's exactly, and
     training resumes at step 4 with steps 4-5 reproducing the reference's.
     Distributed-optimizer state into a plain optimizer is refused with a one-line error (its
     format differs; take the weights only); see FULL_STATE for the CPU limitation.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import layout_workers as lw

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

SAVED_AT = 3
# Each of the three jobs takes ~20-40 s on an idle 2-core machine (8 cases + pool start).
TIMEOUT_S = 300
# (placement, moe, layout the checkpoint is saved with)
SOURCES = [
    ("spannorm", False, "tp2"),
    ("spannorm", False, "pp2"),
    ("spannorm", False, "dp2-distopt"),
    ("spannorm", True, "tp2-sp"),
    ("spannorm", True, "pp2-vpp2"),
    ("spannorm", True, "ep2"),
    ("b2t", True, "ep2"),
    ("hybridnorm", False, "pp2"),
]
MODELS = sorted({(p, moe) for p, moe, _ in SOURCES})


def _name(placement: str, moe: bool, layout: str) -> str:
    return lw.Case(placement, moe, layout, None, "").name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dist_pool):
    base = tmp_path_factory.mktemp("reshard")
    ref_cases = [lw.Case(p, moe, "tp1", None, str(base / _name(p, moe, "tp1"))) for p, moe in MODELS]
    reference = dist_pool(1).run(lw.run_cases, ref_cases, timeout=TIMEOUT_S)[0]
    sources = [
        lw.Case(
            p,
            moe,
            layout,
            str(base / _name(p, moe, "tp1") / "step_0000000"),
            str(base / _name(p, moe, layout)),
            save=True,
            steps=SAVED_AT,
            state=(p, moe, layout) in FULL_STATE,
        )
        for p, moe, layout in SOURCES
    ]
    saved = dist_pool(2).run(lw.run_cases, sources, timeout=TIMEOUT_S)[0]
    jobs = [
        lw.Reload(p, moe, "tp1", saved[_name(p, moe, layout)]["checkpoint"], False)
        for p, moe, layout in SOURCES
    ]
    jobs += [
        lw.Reload(p, moe, "tp1", saved[_name(p, moe, layout)]["checkpoint"], True)
        for p, moe, layout in FULL_STATE
    ]
    # Distributed-optimizer state into a plain optimizer: refused with a one-line fix.
    jobs.append(
        lw.Reload(
            "spannorm", False, "tp1", saved[_name("spannorm", False, "dp2-distopt")]["checkpoint"], True
        )
    )
    reloaded = dist_pool(1).run(lw.reload_cases, jobs, timeout=TIMEOUT_S)[0]
    return reference, saved, reloaded


# Full-state resume from the distributed optimizer is left out: on CPU (torch Adam, no Apex/TE)
# Megatron-Core 0.19.2 cannot load its fully_reshardable state into a fresh DistributedOptimizer
# (DistributedOptimizer.state_dict asserts one common Adam 'step', and after filling the state,
# _set_main_param_and_optimizer_states fails on the missing 'step' tensor). Such checkpoints move
# between layouts with checkpoint.load_optimizer=false (tested above).
# EP2 -> EP1 full-state is left out too: Megatron-Core builds a separate expert optimizer whose
# param groups are keyed by is_expert_parallel, and the EP1 optimizer chain does not find the EP2
# groups ("Could not find parameter group with key ..."); EP changes also go weights-only.
FULL_STATE = [s for s in SOURCES if "distopt" not in s[2] and "ep2" not in s[2]]
IDS = [f"{_name(*s)}-to-tp1" for s in SOURCES]
FULL_IDS = [f"{_name(*s)}-to-tp1" for s in FULL_STATE]


@pytest.mark.parametrize("placement,moe,layout", SOURCES, ids=IDS)
def test_weights_only_load_keeps_the_validation_loss(runs, placement, moe, layout):
    _, saved, reloaded = runs
    source = saved[_name(placement, moe, layout)]
    result = reloaded[lw.Reload(placement, moe, "tp1", source["checkpoint"], False)]
    assert result["step"] == 0  # weights only: a new run starts at step 0
    # Same weights, different reduction order (TP/PP/EP split): equal up to fp32 rounding.
    assert result["valid"] == pytest.approx(source["valid"], rel=1e-6)


@pytest.mark.parametrize("placement,moe,layout", FULL_STATE, ids=FULL_IDS)
def test_full_state_resumes_in_another_layout(runs, placement, moe, layout):
    reference, saved, reloaded = runs
    source = saved[_name(placement, moe, layout)]
    result = reloaded[lw.Reload(placement, moe, "tp1", source["checkpoint"], True)]
    ref = reference[_name(placement, moe, "tp1")]["losses"]
    assert result["step"] == SAVED_AT
    assert result["valid"] == pytest.approx(source["valid"], rel=1e-6)
    assert source["losses"] == pytest.approx(ref[:SAVED_AT], rel=1e-5)
    assert result["losses"] == pytest.approx(ref[SAVED_AT:], rel=1e-5), (result["losses"], ref)


@pytest.mark.parametrize("placement,moe,layout", FULL_STATE, ids=FULL_IDS)
def test_full_state_reshards_adam_moments_and_lr_schedule(runs, placement, moe, layout):
    """The loaded optimizer and scheduler state itself, not only the losses it leads to."""
    _, saved, reloaded = runs
    source = saved[_name(placement, moe, layout)]
    want = source["state"]
    got = reloaded[lw.Reload(placement, moe, "tp1", source["checkpoint"], True)]["state"]
    assert got["scheduler"] == want["scheduler"]
    assert want["scheduler"]["num_steps"] == SAVED_AT
    assert got["lr"] == want["lr"] > 0
    # Keys: every parameter of the one-process model x both moments; the saving layout's shards
    # (TP halves, PP stages, VPP chunks) gathered under the same global names.
    params = {name for name, _ in got["adam"]}
    assert got["adam"].keys() == want["adam"].keys() == {(n, m) for n in params for m in lw.ADAM_MOMENTS}
    assert got["adam_steps"] == want["adam_steps"] and set(got["adam_steps"].values()) == {SAVED_AT}
    # Trained moments (not a fresh optimizer's zeros), copied bit for bit.
    assert all(want["adam"][(n, "exp_avg_sq")].abs().sum() > 0 for n in params)
    different = [key for key, value in want["adam"].items() if not torch.equal(got["adam"][key], value)]
    assert not different, different[:5]


def test_distributed_optimizer_state_into_a_plain_optimizer_is_refused_in_one_line(runs):
    _, saved, reloaded = runs
    path = saved[_name("spannorm", False, "dp2-distopt")]["checkpoint"]
    error = reloaded[lw.Reload("spannorm", False, "tp1", path, True)]["error"]
    assert "\n" not in error
    assert "parallel.use_distributed_optimizer=true" in error and "checkpoint.load_optimizer=false" in error

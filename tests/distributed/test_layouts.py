"""Every parallel layout trains like one process: 5 optimizer steps, same data, same numbers.

One process builds each model (TP=PP=EP=1), saves it as the shared starting point and trains
it; every layout then loads those weights (weights-only load through dist_checkpointing, so
each layout starts from identical parameters even where per-stage init would differ) and trains
the same 5 global batches through megaspan's Trainer. Per-step losses and the final validation
loss must match the single-process run to 1e-5 relative.

Coverage: SpanNorm dense and MoE on every layout; B2T, Pre-LN and HybridNorm on TP2+SP and
PP2xVPP2 (the layouts that split the layer and reorder the stages); the full placement x layout
matrix with ``pytest --all``. Ranks come from the session's process pools (world 1, 2, 4), and
each layout is its own job with its own timeout, so one slow or hung layout fails alone.
"""

from __future__ import annotations

import pytest

from tests.distributed import layout_workers as lw

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

PLACEMENTS = ("spannorm", "b2t", "pre", "hybridnorm")
MODELS = [(p, moe) for p in PLACEMENTS for moe in (False, True)]
# layout -> world size. MoE models need sequence parallelism with TP, and EP needs experts.
LAYOUTS = {
    "tp2": 2,
    "tp2-sp": 2,
    "pp2": 2,
    "pp2-vpp2": 2,
    "dp2-distopt": 2,
    "ep2": 2,
    "pp2-uneven": 2,  # 1 + 3 layers
    "tp2-sp-pp2": 4,
    "dp2-ep2-distopt": 4,
}
REPRESENTATIVE = ("tp2-sp", "pp2-vpp2")  # where every placement runs without --all
REL = 1e-5
# Measured on an idle 2-core machine: ~1 s per case at world 1, ~2 s at world 2, ~5 s at world 4
# (plus ~10 s to start a pool); 10x margin per case and 60 s for the start, for a loaded CI box.
SECONDS_PER_CASE = {1: 10, 2: 20, 4: 50}


def _applies(placement: str, moe: bool, layout: str) -> bool:
    if layout == "tp2":
        return not moe
    if "ep2" in layout:
        return moe
    if layout == "pp2-uneven" or layout == "dp2-ep2-distopt":
        return placement == "spannorm"  # the stage split and expert-DP split do not depend on it
    return True


def _selected(placement: str, layout: str, full: bool) -> bool:
    return full or placement == "spannorm" or layout in REPRESENTATIVE


def _name(placement: str, moe: bool, layout: str) -> str:
    return lw.Case(placement, moe, layout, None, "").name


def _params(layouts) -> list:
    params = []
    for layout in layouts:
        for placement, moe in MODELS:
            if not _applies(placement, moe, layout):
                continue
            marks = () if _selected(placement, layout, False) else (pytest.mark.full_matrix,)
            params.append(pytest.param(placement, moe, layout, id=_name(placement, moe, layout), marks=marks))
    return params


@pytest.fixture(scope="module")
def full(request) -> bool:
    return request.config.getoption("--all")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def reference(base, dist_pool, full) -> dict[str, dict]:
    models = [(p, moe) for p, moe in MODELS if full or any(_selected(p, lay, False) for lay in LAYOUTS)]
    cases = [lw.Case(p, moe, "tp1", None, str(base / _name(p, moe, "tp1"))) for p, moe in models]
    return dist_pool(1).run(lw.run_cases, cases, timeout=SECONDS_PER_CASE[1] * len(cases) + 60)[0]


@pytest.fixture(scope="module")
def layout_runs(base, reference, dist_pool, full):
    """``get(layout)`` -> per-rank results of every selected model on that layout (run once)."""
    done: dict[str, list] = {}

    def get(layout: str) -> list[dict[str, dict]]:
        if layout not in done:
            cases = [
                lw.Case(
                    p,
                    moe,
                    layout,
                    str(base / _name(p, moe, "tp1") / "step_0000000"),
                    str(base / _name(p, moe, layout)),
                )
                for p, moe in MODELS
                if _applies(p, moe, layout) and _selected(p, layout, full)
            ]
            world = LAYOUTS[layout]
            done[layout] = dist_pool(world).run(
                lw.run_cases, cases, timeout=SECONDS_PER_CASE[world] * len(cases) + 60
            )
        return done[layout]

    return get


def test_reference_learns(reference):
    """Guard against a vacuous comparison: the 5 steps really change the model."""
    for name, result in reference.items():
        assert result["losses"][-1] < result["losses"][0] - 0.1, (name, result["losses"])


@pytest.mark.parametrize("placement,moe,layout", _params(LAYOUTS))
def test_layout_matches_one_process(reference, layout_runs, placement, moe, layout):
    ref = reference[_name(placement, moe, "tp1")]
    got = [r[_name(placement, moe, layout)] for r in layout_runs(layout)]
    # The trainer all-reduces the reported loss, so every rank must report the same numbers.
    assert all(g["losses"] == got[0]["losses"] for g in got)
    assert got[0]["losses"] == pytest.approx(ref["losses"], rel=REL), (got[0]["losses"], ref["losses"])
    assert got[0]["valid"] == pytest.approx(ref["valid"], rel=REL)

"""Every parallel layout trains like one process: 5 optimizer steps, same data, same numbers.

One process builds each model (TP=PP=EP=1), saves it as the shared starting point and trains
it; every layout then loads those weights (weights-only load through dist_checkpointing, so
each layout starts from identical parameters even where per-stage init would differ) and trains
the same 5 global batches through megaspan's Trainer. Per-step losses and the final validation
loss must match the single-process run to 1e-5 relative.

Three process groups in total (world 1, 2 and 4), each running many cases in a row.
"""

from __future__ import annotations

import pytest

from tests.distributed import layout_workers as lw
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

PLACEMENTS = ("spannorm", "b2t", "pre", "hybridnorm")
MODELS = [(p, moe) for p in PLACEMENTS for moe in (False, True)]

# Two-process layouts; MoE models need sequence parallelism with TP, and EP needs experts.
WORLD2 = ("tp2", "tp2-sp", "pp2", "pp2-vpp2", "dp2-distopt", "ep2")
WORLD4 = ("tp2-sp-pp2", "dp2-ep2-distopt")
REL = 1e-5


def _applies(layout: str, moe: bool) -> bool:
    if layout == "tp2":
        return not moe
    if "ep2" in layout:
        return moe
    return True


def _cases(base, layouts: tuple[str, ...], models=MODELS) -> list[lw.Case]:
    init = {m: str(base / _name(*m, "tp1") / "step_0000000") for m in MODELS}
    return [
        lw.Case(p, moe, layout, init[(p, moe)], str(base / _name(p, moe, layout)))
        for p, moe in models
        for layout in layouts
        if _applies(layout, moe)
    ]


def _name(placement: str, moe: bool, layout: str) -> str:
    return lw.Case(placement, moe, layout, None, "").name


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def reference(base) -> dict[str, dict]:
    cases = [lw.Case(p, moe, "tp1", None, str(base / _name(p, moe, "tp1"))) for p, moe in MODELS]
    return run_distributed(lw.run_cases, 1, cases)[0]


@pytest.fixture(scope="module")
def world2(base, reference) -> list[dict[str, dict]]:
    cases = _cases(base, WORLD2)
    # Uneven stages (1 + 3 layers) for one dense and one MoE model.
    cases += _cases(base, ("pp2-uneven",), models=[("spannorm", False), ("spannorm", True)])
    return run_distributed(lw.run_cases, 2, cases)


@pytest.fixture(scope="module")
def world4(base, reference) -> list[dict[str, dict]]:
    cases = _cases(base, WORLD4[:1])
    cases += _cases(base, WORLD4[1:], models=[("spannorm", True)])
    return run_distributed(lw.run_cases, 4, cases)


def _check(reference: dict, ranks: list[dict], placement: str, moe: bool, layout: str) -> None:
    ref = reference[_name(placement, moe, "tp1")]
    got = [r[_name(placement, moe, layout)] for r in ranks]
    # The trainer all-reduces the reported loss, so every rank must report the same numbers.
    assert all(g["losses"] == got[0]["losses"] for g in got)
    assert got[0]["losses"] == pytest.approx(ref["losses"], rel=REL), (got[0]["losses"], ref["losses"])
    assert got[0]["valid"] == pytest.approx(ref["valid"], rel=REL)


def test_reference_learns(reference):
    """Guard against a vacuous comparison: the 5 steps really change the model."""
    for name, result in reference.items():
        assert result["losses"][-1] < result["losses"][0] - 0.1, (name, result["losses"])


WORLD2_PARAMS = [(p, m, l) for p, m in MODELS for l in WORLD2 if _applies(l, m)]
WORLD2_PARAMS += [("spannorm", False, "pp2-uneven"), ("spannorm", True, "pp2-uneven")]


@pytest.mark.parametrize("placement,moe,layout", WORLD2_PARAMS, ids=[_name(*p) for p in WORLD2_PARAMS])
def test_two_process_layout_matches_one_process(reference, world2, placement, moe, layout):
    _check(reference, world2, placement, moe, layout)


WORLD4_PARAMS = [(p, m, "tp2-sp-pp2") for p, m in MODELS] + [("spannorm", True, "dp2-ep2-distopt")]


@pytest.mark.parametrize("placement,moe,layout", WORLD4_PARAMS, ids=[_name(*p) for p in WORLD4_PARAMS])
def test_four_process_layout_matches_one_process(reference, world4, placement, moe, layout):
    _check(reference, world4, placement, moe, layout)

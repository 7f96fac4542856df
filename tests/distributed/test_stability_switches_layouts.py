"""The stability switches train like one process under the layouts that split what they touch:
``model.qk_layernorm`` (the per-head Q/K norms under TP, heads split over ranks) and
``training.z_loss`` (log Z over a vocabulary split over TP ranks; the LM head and the loss only on
the last pipeline stage, also interleaved). Same weights, same batches, 5 steps: the per-step
losses and the final validation loss match the single-process run to 1e-5, as in test_layouts.py;
the one-process numbers themselves are pinned to tests/unit/reference.py in
tests/unit/test_stability_switches.py."""

from __future__ import annotations

import pytest

from tests.distributed import layout_workers as lw

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

SWITCHES = ("model.qk_layernorm=true", "training.z_loss=0.1")
LAYOUTS = ("tp2", "tp2-sp", "pp2-vpp2")
REL = 1e-5


def test_switches_match_one_process(dist_pool, tmp_path):
    def case(layout: str, init: str | None, switches=SWITCHES, tag="stab") -> lw.Case:
        return lw.Case("pre", False, layout, init, str(tmp_path / f"{layout}-{tag}"), extra=switches, tag=tag)

    ref_case, plain_case = case("tp1", None), case("tp1", None, (), "plain")
    ref = dist_pool(1).run(lw.run_cases, [ref_case, plain_case], timeout=180)[0]
    # Not vacuous: the switches change what the model trains to.
    assert ref[ref_case.name]["losses"] != pytest.approx(ref[plain_case.name]["losses"], rel=1e-3)
    init = str(tmp_path / "tp1-stab" / "step_0000000")
    cases = [case(layout, init) for layout in LAYOUTS]
    runs = dist_pool(2).run(lw.run_cases, cases, timeout=300)
    want = ref[ref_case.name]
    for c in cases:
        got = runs[0][c.name]
        assert all(r[c.name]["losses"] == got["losses"] for r in runs), c.name
        assert got["losses"] == pytest.approx(want["losses"], rel=REL), (
            c.name,
            got["losses"],
            want["losses"],
        )
        assert got["valid"] == pytest.approx(want["valid"], rel=REL), c.name

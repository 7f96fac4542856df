"""``checkpoint.async_save`` under 2-rank layouts (gloo): TP2, PP2 and DP2 with the distributed
optimizer.

Each layout trains 4 steps twice from the same starting weights, saving at step 2: once
synchronously, once in the background (the write over the background gloo group while the ranks
train steps 3-4 on their own groups). Both runs must train identically, both step-2 checkpoints
must be committed and intact, and one process must load the same weights from either (equal
validation loss).
"""

from __future__ import annotations

import pytest

from megaspan.training.checkpoint import checkpoint_name, is_valid, read_meta
from tests.distributed import layout_workers as lw

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

TIMEOUT_S = 300
LAYOUTS = ("tp2", "pp2", "dp2-distopt")
SAVE = ("checkpoint.save_interval=2", "checkpoint.keep_last=null")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dist_pool):
    base = tmp_path_factory.mktemp("async")
    start = lw.Case("spannorm", False, "tp1", None, str(base / "init"), steps=1)  # saves step 0
    dist_pool(1).run(lw.run_cases, [start], timeout=TIMEOUT_S)
    init = str(base / "init" / checkpoint_name(0))
    cases = [
        lw.Case(
            "spannorm",
            False,
            layout,
            init,
            str(base / f"{layout}-{mode}"),
            steps=4,
            extra=(*SAVE, f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"),
            tag=mode,
        )
        for layout in LAYOUTS
        for mode in ("sync", "async")
    ]
    trained = dist_pool(2).run(lw.run_cases, cases, timeout=TIMEOUT_S)[0]
    jobs = [
        lw.Reload("spannorm", False, "tp1", str(base / f"{layout}-{mode}" / checkpoint_name(2)), False)
        for layout in LAYOUTS
        for mode in ("sync", "async")
    ]
    reloaded = dist_pool(1).run(lw.reload_cases, jobs, timeout=TIMEOUT_S)[0]
    return base, trained, reloaded


@pytest.mark.parametrize("layout", LAYOUTS)
def test_background_saves_commit_the_same_state_under_a_layout(runs, layout):
    base, trained, reloaded = runs
    sync, background = (trained[f"spannorm-dense-{layout}-{mode}"] for mode in ("sync", "async"))
    assert background["losses"] == sync["losses"]  # the background write does not touch training
    paths = {mode: base / f"{layout}-{mode}" / checkpoint_name(2) for mode in ("sync", "async")}
    for path in paths.values():
        assert is_valid(path, verify=True), path
        assert read_meta(path)["step"] == 2 and read_meta(path)["world_size"] == 2
    assert not list((base / f"{layout}-async").glob("tmp-*"))
    loads = [reloaded[lw.Reload("spannorm", False, "tp1", str(paths[m]), False)] for m in ("sync", "async")]
    assert "error" not in loads[0] and "error" not in loads[1], loads
    assert loads[0]["valid"] == loads[1]["valid"]

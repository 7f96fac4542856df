"""The in-loop downstream hook scores the live model under TP2 and PP2 (and PP2 x VPP2) as one
process scores the same weights: one process saves a tiny model and scores it through
``megaspan eval``'s path; each layout loads those weights (weights-only) into a real trainer on
two gloo ranks and runs the hook (and the adapter's log-likelihood and greedy generation requests
directly). Every rank must report the same numbers, equal to the one-process ones to fp32
precision (TP sums the softmax over vocabulary shards in another order).
"""

from __future__ import annotations

import pytest

from tests.distributed import downstream_workers as dw
from tests.helpers.evaluate import TEXT, write_tasks

pytest.importorskip("lm_eval")

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

LAYOUTS = ("tp2", "pp2", "pp2-vpp2")
REL = 1e-5
# Saving, loading and two lm-eval runs of a 4-layer model: ~30 s on an idle 2-core machine, most
# of it the harness's task index and dataset loading; 10x margin for a loaded box.
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def one_process(dist_pool, tiny_corpus, tmp_path_factory):
    tokenizer, _ = tiny_corpus
    root = tmp_path_factory.mktemp("downstream-layouts")
    tasks = write_tasks(root, TEXT)
    (ref,) = dist_pool(1).run(
        dw.reference, str(tokenizer.path), str(root / "ckpt"), str(tasks), str(root / "hf"), timeout=TIMEOUT_S
    )
    return dict(root=root, tasks=tasks, tokenizer=str(tokenizer.path), **ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_hook_under_a_layout_scores_like_one_process(dist_pool, one_process, layout):
    ref = one_process
    per_rank = dist_pool(2).run(
        dw.live,
        layout,
        ref["tokenizer"],
        ref["checkpoint"],
        str(ref["tasks"]),
        str(ref["root"] / "hf"),
        str(ref["root"] / f"run-{layout}"),
        timeout=TIMEOUT_S,
    )
    first = per_rank[0]
    for other in per_rank[1:]:  # the harness on every rank saw the same numbers
        assert other == first
    for (logprob, greedy), (want, want_greedy) in zip(
        first["loglikelihoods"], ref["loglikelihoods"], strict=True
    ):
        assert logprob == pytest.approx(want, rel=REL, abs=1e-5)
        assert greedy == want_greedy
    assert ref["generated"] != [""]  # something to compare
    assert first["generated"] == ref["generated"]  # greedy, through the logits gathered over TP
    assert first["scores"].keys() == ref["scores"].keys() == set(dw.TASKS)
    for task, metrics in ref["scores"].items():
        assert first["scores"][task].keys() == metrics.keys()
        for metric, value in metrics.items():
            assert first["scores"][task][metric] == pytest.approx(value, rel=REL), (layout, task, metric)

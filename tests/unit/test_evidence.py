"""The LR x depth evidence on synthetic run summaries, against hand-computed values: t intervals,
unigram entropy from a real .bin/.idx, the collapsed status, LR sensitivity, best LR, depth gain,
the ranking at N vs N/2 and every claim verdict (including diverged, collapsed and missing cells
and a single seed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megaspan.report import evidence
from megaspan.report.collect import collect, mark_collapsed
from megaspan.report.stats import (
    compare,
    kendall_tau,
    lr_sensitivity,
    t975,
    t_interval,
    unigram_entropy,
    welch_interval,
)

L0 = 4.5  # step-0 validation loss of every synthetic run
H = math.log(64)  # the synthetic training data: tokens 0..63, each four times -> uniform unigram

# (placement, depth, lr) -> final loss per seed; "D" = diverged. Seeds 1..n.
GRID: dict[tuple[str, int, float], list] = {
    ("pre", 2, 1e-3): [3.5],
    ("pre", 2, 1e-2): [3.20, 3.22, 3.24],
    ("pre", 2, 1e-1): [3.6],
    ("pre", 8, 1e-3): [3.4],
    ("pre", 8, 1e-2): [3.30, 3.32, 3.34],
    ("pre", 8, 1e-1): ["D"],
    ("spannorm", 2, 1e-3): [3.6],
    ("spannorm", 2, 1e-2): [3.30, 3.31, 3.32],
    ("spannorm", 2, 1e-1): [3.4],
    ("spannorm", 8, 1e-3): [3.3],
    ("spannorm", 8, 1e-2): [3.25],
    ("spannorm", 8, 1e-1): [3.10, 3.12, 3.14],
    ("post", 2, 1e-3): [3.5],
    ("post", 2, 1e-2): [3.40, 3.45, 3.50],
    ("post", 2, 1e-1): [4.1],  # collapsed: 4.1 >= ln 64 - 0.1 = 4.0589
    ("post", 8, 1e-3): [3.6, 3.7, 3.8],
    ("post", 8, 1e-2): [4.2],  # collapsed
    ("post", 8, 1e-1): ["D"],
    ("b2t", 8, 1e-3): [3.5],  # one seed, the rest of its grid missing
    ("hybridnorm", 2, 1e-2): [3.00, 3.01, 3.02],
    ("hybridnorm", 8, 1e-2): [3.30, 3.35, 3.40],
    ("hybridnorm_star", 8, 1e-2): [3.60, 3.61, 3.62],
    ("deepnorm", 2, 1e-2): [3.5],
    ("deepnorm", 2, 1e-1): [4.3],  # collapsed where post collapsed
    ("deepnorm", 8, 1e-3): [3.5, 3.5],
    ("deepnorm", 8, 1e-2): [4.15],  # collapsed
    ("deepnorm", 8, 1e-1): ["D"],
    ("mixln", 8, 1e-2): [3.3, 3.31, 3.32],
    ("lns", 8, 1e-2): [3.3],
    # Seed 1 (the grid) picks 1e-3; its stage-2 seeds raise the mean there (3.333) above 1e-2's
    # single seed (3.2): the best LR stays the one the sweep chose.
    ("lns", 2, 1e-3): [3.0, 3.5, 3.5],
    ("lns", 2, 1e-2): [3.2],
    ("peri", 8, 1e-3): ["D"],  # diverged at every LR of its (finished) grid
    ("peri", 8, 1e-2): ["D", "D"],
}
# Cells listed in sweep.json that never ran (a sweep still running): no run dir, status pending.
PENDING = [("hybridnorm_star", 2, 1e-2, 1), ("hybridnorm_star", 2, 1e-2, 2)]


def _write_data(prefix: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(4):
        ids = np.arange(64, dtype=np.int32)
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


def _diagnostics(placement: str, depth: int, seed: int) -> list[dict]:
    """Step 1 (the profile at initialisation: Post-LN's first quarter of layers gets 1e-5 of the
    gradient of its last quarter) and step 20 (every gradient 1.0: only the step-1 record shows
    the vanishing, so the claim must read it)."""
    records = []
    for step in (1, 20):
        layers = {}
        for layer in range(1, depth + 1):
            late = layer > depth - depth // 4
            angle = (0.2 if placement == "mixln" else 0.05) + 0.001 * seed if late else 0.3
            grad = 1e-5 if step == 1 and placement == "post" and layer <= depth // 4 else 1.0
            layers[str(layer)] = {
                "angular_distance": angle,
                "attn_grad_norm": grad,
                "mlp_grad_norm": 0.0,
                "token_cosine": 0.999,  # high everywhere: must not collapse anyone by default
                "rms": 1.0,
                "attn_max_logit": 2.0 * layer,  # a mechanism field the report plots generically
            }
        model = {"lm_head_log_z": 6.0 + step / 100, "relative_update": 0.01 * step}
        records.append({"step": step, "layers": layers, "model": model})
    return records


def _write_run(root: Path, prefix: Path, p: str, d: int, lr: float, seed: int, loss) -> dict:
    name = f"{p}-L{d}-lr{lr:g}-s{seed}"
    run = root / name
    run.mkdir(parents=True)
    diverged = loss == "D"
    final = None if diverged else float(loss)
    summary = {
        "status": "diverged" if diverged else "completed",
        "final_val_loss": final,
        "final_train_loss": None if diverged else final + 0.1,
        "initial_val_loss": L0,
        "loss_spikes": 0,
        "config": {
            "model": {"norm_placement": p, "num_layers": d},
            "optimizer": {"lr": lr},
            "training": {"seed": seed},
        },
        "data": {"train": [str(prefix)]},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if not diverged:
        # Validation at 0, 10 (= final + 0.3: the same order as at 20) and 20.
        log = [f"valid loss {L0:.6f} | ppl 1 | step 0", f"valid loss {final + 0.3:.6f} | ppl 1 | step 10"]
        log += [f"step 20/20 | loss {final:.6f} | lr 1e-3", f"valid loss {final:.6f} | ppl 1 | step 20"]
        (run / "train.log").write_text("\n".join(log) + "\n")
        (run / "diagnostics.jsonl").write_text(
            "\n".join(json.dumps(r) for r in _diagnostics(p, d, seed)) + "\n"
        )
    values = {"model.norm_placement": p, "model.num_layers": d, "optimizer.lr": lr, "training.seed": seed}
    return {"index": 0, "name": name, "overrides": [], "values": values}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("evidence")
    prefix = base / "data" / "train"
    prefix.parent.mkdir()
    _write_data(prefix)
    root = base / "sweep"
    cells = []
    for (p, d, lr), losses in GRID.items():
        for seed, loss in enumerate(losses, start=1):
            cells.append(_write_run(root, prefix, p, d, lr, seed, loss))
    for p, d, lr, seed in PENDING:
        values = {"model.norm_placement": p, "model.num_layers": d, "optimizer.lr": lr, "training.seed": seed}
        cells.append({"index": 0, "name": f"{p}-L{d}-lr{lr:g}-s{seed}", "overrides": [], "values": values})
    (root / "sweep.json").write_text(json.dumps({"name": "evidence", "config": None, "cells": cells}))
    return root


@pytest.fixture(scope="module")
def runs(sweep):
    return collect([sweep])


def _claim(rows, startswith: str):
    match = [r for r in rows if r.claim.startswith(startswith)]
    assert len(match) == 1, [r.claim for r in rows]
    return match[0]


# --- statistics ----------------------------------------------------------------------------------


def test_t_interval_by_hand():
    iv = t_interval([3.30, 3.32, 3.34])
    half = 4.302653 * 0.02 / math.sqrt(3)  # t_{0.975,2} s / sqrt(n)
    assert iv.mean == pytest.approx(3.32) and iv.n == 3
    assert iv.lo == pytest.approx(3.32 - half) and iv.hi == pytest.approx(3.32 + half)
    one = t_interval([3.5, None, math.nan])  # one finite value: a mean, no interval
    assert one.n == 1 and one.lo is None and one.hi is None
    assert t_interval([None]) is None
    assert t975(1) == pytest.approx(12.706205) and t975(4.7) == pytest.approx(2.776445)
    assert t975(1000) == pytest.approx(1.959964)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-5)


def test_welch_interval_by_hand():
    iv = welch_interval([3.30, 3.32, 3.34], [3.20, 3.22, 3.24])
    # equal variances 0.0004 and n = 3: se = sqrt(2 * 0.0004 / 3), Welch df = 4
    half = 2.776445 * math.sqrt(2 * 0.0004 / 3)
    assert iv.mean == pytest.approx(0.10) and iv.lo == pytest.approx(0.10 - half)
    assert welch_interval([3.3], [3.2, 3.3]).lo is None


def test_compare_rule():
    a, b = t_interval([3.10, 3.12, 3.14]), t_interval([3.30, 3.32, 3.34])
    assert compare(a, b) == "below" and compare(b, a) == "above"
    assert compare(t_interval([3.30, 3.35, 3.40]), b) == "overlap"
    assert compare(t_interval([3.0]), b) == "overlap"  # a single seed never separates


def test_unigram_entropy_from_bin(sweep):
    entropy, tokens = unigram_entropy([sweep.parent / "data" / "train"])
    assert tokens == 256 and entropy == pytest.approx(math.log(64))


def test_unigram_entropy_skewed(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{tmp_path / 'd'}.bin", dtype=np.int32)
    builder.add_document(np.array([0, 0, 1, 2], dtype=np.int32), [4])
    builder.finalize(f"{tmp_path / 'd'}.idx")
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert unigram_entropy([tmp_path / "d"])[0] == pytest.approx(1.5 * math.log(2))


def test_lr_sensitivity_by_hand():
    # pre at depth 8: l(1e-3) = 3.4, l(1e-2) = 3.32, 1e-1 diverged -> l0 = 4.5; l* = 3.32
    lrs = lr_sensitivity({1e-3: [3.4], 1e-2: [3.30, 3.32, 3.34], 1e-1: [None]}, 4.5)
    assert lrs.best == pytest.approx(3.32)
    assert lrs.value == pytest.approx(((3.4 - 3.32) + 0 + (4.5 - 3.32)) / 3)
    # A loss above l0 is capped at l0; an LR with no runs is left out.
    capped = lr_sensitivity({1e-3: [5.0], 1e-2: [4.0], 1e-1: []}, 4.5)
    assert capped.value == pytest.approx((0.5 + 0) / 2) and capped.lrs == 2
    assert lr_sensitivity({}, 4.5) is None


def test_kendall_tau():
    assert kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1
    assert kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1
    assert kendall_tau(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)


# --- the collapsed status -----------------------------------------------------------------------


def test_collapsed_status(runs):
    status = {r.name: r.status for r in runs}
    assert status["post-L8-lr0.01-s1"] == "collapsed"  # 4.2 >= ln 64 - 0.1
    assert status["post-L2-lr0.1-s1"] == "collapsed"  # 4.1 >= 4.0589
    assert status["post-L8-lr0.1-s1"] == "diverged"  # diverged stays diverged
    # Token cosine 0.999 everywhere: the cosine rule is opt-in, so learning runs stay completed.
    assert status["pre-L8-lr0.01-s1"] == "completed"
    assert sum(r.collapsed for r in runs) == 4
    assert status["hybridnorm_star-L2-lr0.01-s1"] == "pending"
    assert "unigram entropy 4.159" in next(r for r in runs if r.name == "post-L8-lr0.01-s1").collapse_reason


def test_collapse_rules_at_the_boundary(sweep):
    run = next(r for r in collect([sweep]) if r.name == "pre-L8-lr0.01-s1")  # a copy to change
    for loss, expected in ((H - 0.1 - 1e-6, "completed"), (H - 0.1 + 1e-6, "collapsed")):
        run.status, run.summary["final_val_loss"] = "completed", loss
        assert mark_collapsed(run).status == expected
    run.status, run.summary["final_val_loss"] = "completed", 3.3
    assert mark_collapsed(run, cosine=0.99).status == "collapsed"  # 0.999 > 0.99
    assert "token cosine 0.9990" in run.collapse_reason
    run.status, run.collapse_reason = "completed", ""
    assert mark_collapsed(run, cosine=0.9995).status == "completed"
    # No entropy known (the run recorded no data) and no cosine rule: never collapsed.
    run.unigram_entropy, run.summary["final_val_loss"] = None, 9.0
    assert mark_collapsed(run).status == "completed"


# --- groups, best LR, sensitivity, depth gain ---------------------------------------------------


def test_best_lr_and_sensitivity(runs):
    gs = {(g.placement, g.depth): g for g in evidence.groups(runs)}
    pre8 = gs[("pre", 8)]
    assert pre8.best_lr == 1e-2 and pre8.l0 == pytest.approx(L0)
    assert pre8.best.mean == pytest.approx(3.32) and pre8.best.n == 3
    assert pre8.sensitivity.value == pytest.approx(((3.4 - 3.32) + (4.5 - 3.32)) / 3)
    post8 = gs[("post", 8)]
    # 1e-3 best (3.7); 1e-2 collapsed at 4.2 (counted as its loss); 1e-1 diverged (counted as l0)
    assert post8.best_lr == 1e-3
    assert post8.sensitivity.value == pytest.approx((0 + (4.2 - 3.7) + (4.5 - 3.7)) / 3)
    assert gs[("spannorm", 8)].best_lr == 1e-1
    lns2 = gs[("lns", 2)]
    assert lns2.best_lr == 1e-3 and lns2.best.mean == pytest.approx(10 / 3) and lns2.best.n == 3
    assert gs[("b2t", 8)].sensitivity.lrs == 1  # missing cells are left out, and said so


def test_tables(runs):
    headers, rows = evidence.loss_vs_lr_table(runs)
    assert headers == ["placement", "depth", "lr 0.001", "lr 0.01", "lr 0.1"]
    post8 = next(r for r in rows if r[:2] == ["post", "8"])
    assert post8[2:] == ["3.700 *", "4.200 C", "- D"]
    assert next(r for r in rows if r[:2] == ["b2t", "8"])[2:] == ["3.500 *", "missing", "missing"]

    headers, rows = evidence.best_lr_table(runs)
    assert headers[-1] == "depth gain L8-L2 (95% CI)"
    pre = next(r for r in rows if r[0] == "pre")
    half = 2.776445 * math.sqrt(2 * 0.0004 / 3)
    assert pre[-1] == f"0.1000 [{0.1 - half:.4f}, {0.1 + half:.4f}] (n=3)"
    assert pre[4] == "0.01" and pre[5].startswith("3.3200 [3.2703, 3.3697]")
    b2t = next(r for r in rows if r[0] == "b2t")
    assert b2t[1:4] == ["-", "missing", "-"] and b2t[-1] == "-"
    assert b2t[6] == "0.000 (1 LRs)"  # one LR: min(3.5, 4.5) - 3.5 = 0, flagged as 1 of 3 LRs
    headers, rows = evidence.ranking_table(runs)
    depth8 = [r for r in rows if r[0] == "8"]
    assert [r[1] for r in depth8] == ["10", "20"] and depth8[0][3] == "1.00"
    # At L8 the lowest best-LR loss is SpanNorm's (3.12 at lr 0.1), then Mix-LN's 3.31 ...
    assert depth8[1][2].split(", ")[:3] == ["spannorm 3.120", "lns 3.300", "mixln 3.310"]


# --- claims --------------------------------------------------------------------------------------


def test_claim_verdicts(runs):
    rows = evidence.claims(runs)
    # SpanNorm [3.07, 3.17] wholly below Pre-LN [3.27, 3.37] at L8 (its best LR 1e-1, Pre-LN's 1e-2)
    row = _claim(rows, "spannorm reaches a lower loss than Pre-LN")
    assert row.verdict == "reproduced" and "at lr 0.1" in row.numbers
    # SpanNorm trains at (L8, 1e-2) and (L2, 1e-1)... where post collapsed; (L8, 1e-1) post diverged
    row = _claim(rows, "spannorm trains at LRs where Post-LN does not")
    assert row.verdict == "reproduced" and "L8 lr 0.01" in row.numbers and "L8 lr 0.1" in row.numbers
    # B2T has one seed at its best LR: inconclusive, whatever the means say.
    row = _claim(rows, "B2T reaches a lower loss than Post-LN")
    assert row.verdict == "inconclusive" and "fewer than 2 seeds" in row.numbers
    # HybridNorm vs Pre-LN: reproduced at L2, overlapping at L8.
    assert _claim(rows, "HybridNorm reaches a lower loss than Pre-LN (L2)").verdict == "reproduced"
    row = _claim(rows, "HybridNorm reaches a lower loss than Pre-LN (L8)")
    assert row.verdict == "inconclusive" and "overlap" in row.numbers
    # HybridNorm* wholly above HybridNorm at L8: contradicted; no HybridNorm* runs at L2: inconclusive.
    assert _claim(rows, "HybridNorm* reaches a loss <= HybridNorm's (L8)").verdict == "contradicted"
    # HybridNorm*'s L2 cells are pending (the sweep has not reached them): inconclusive, never
    # "contradicted" for want of a trained LR.
    row = _claim(rows, "HybridNorm* reaches a loss <= HybridNorm's (L2)")
    assert row.verdict == "inconclusive" and "no finished runs of hybridnorm_star at depth 2" in row.numbers
    # DeepNorm fails (collapses or diverges) at every cell where Post-LN fails: contradicted.
    row = _claim(rows, "DeepNorm trains where Post-LN does not")
    assert row.verdict == "contradicted", row.numbers
    # Mix-LN's late-layer angular distance (0.2 + 0.001 s) wholly above Pre-LN's (0.05 + 0.001 s).
    assert _claim(rows, "Mix-LN raises").verdict == "reproduced"
    row = _claim(rows, "LNS raises")  # one seed
    assert row.verdict == "inconclusive" and "fewer than 2 seeds" in row.numbers
    # Post-LN's first-quarter grads are 1e-5 of its last quarter's, at each of its 3 best-LR seeds.
    row = _claim(rows, "Post-LN's early-layer gradients vanish at depth while spannorm's")
    assert row.verdict == "reproduced" and "1.00e-05 (step 1)" in row.numbers


def test_report_sections_and_mechanism_plots(sweep, tmp_path):
    from megaspan.report import build_report

    report = build_report([sweep], tmp_path / "report")
    text = report.page.read_text()
    for heading in ("## Loss vs learning rate", "## Best-LR results and LR sensitivity", "## Claims"):
        assert heading in text
    assert "## Is the run long enough? Ranking at N vs N/2 steps" in text
    assert "| post-L8-lr0.01-s1 | loss 4.200 >= unigram entropy 4.159 - 0.1 | 0.9990 (> 0.99) |" in text
    names = {p.name for p in report.images}
    assert {
        "loss_vs_lr.png",
        "mechanism_L8.png",
        "model_metrics_L8.png",
        "layer_profiles_L8_best_lr.png",
    } <= names
    fig = report.figures["loss_vs_lr"]
    assert [ax.get_title() for ax in fig.axes] == ["depth 2", "depth 8"] and fig.axes[0].get_xscale() == "log"
    assert [ax.get_title() for ax in report.figures["model_metrics_L8"].axes] == [
        "lm_head_log_z",
        "relative_update",
    ]
    assert report.figures["mechanism_L8"].axes[0].get_title() == "attn_max_logit"


def test_a_placement_diverged_at_every_lr_is_worse(runs):
    spec = evidence.Claim("lower", "peri", "pre", "Peri-LN reaches a lower loss than Pre-LN")
    (row,) = evidence.claims(runs, (spec,))
    assert row.verdict == "contradicted" and "no LR trained without divergence: peri" in row.numbers
    # ... but a placement with runs still pending is not judged.
    spec = evidence.Claim("lower", "hybridnorm_star", "hybridnorm", "H* below H", "each")
    row = evidence.claims(runs, (spec,))[0]
    assert row.claim == "H* below H (L2)" and row.verdict == "inconclusive"


def test_claims_without_diagnostics_or_seeds(tmp_path, sweep):
    # The same sweep without diagnostics.jsonl: the mechanism claims are inconclusive with a reason.
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    for path in copy.glob("*/diagnostics.jsonl"):
        path.unlink()
    rows = evidence.claims(collect([copy]))
    row = _claim(rows, "Mix-LN raises")
    assert row.verdict == "inconclusive" and "no angular_distance" in row.numbers
    row = _claim(rows, "Post-LN's early-layer gradients vanish")
    assert row.verdict == "inconclusive" and "no per-layer gradient norms" in row.numbers
    # Only seed 1 everywhere (the grid stage alone): every comparison is inconclusive.
    for path in copy.glob("*-s[23]"):
        shutil.rmtree(path)
    rows = evidence.claims(collect([copy]))
    for r in rows:
        if "lower loss" in r.claim or "<=" in r.claim:
            assert r.verdict in ("inconclusive", "contradicted"), r
            if r.verdict == "contradicted":
                pytest.fail(f"a single seed gave a verdict: {r}")


def test_trains_where_needs_two_witness_runs(runs):
    # Only one witness cell with one seed each: inconclusive.
    one = [r for r in runs if not (r.placement == "spannorm" and r.lr == 1e-1 and r.depth == 8)]
    one = [r for r in one if not (r.placement == "post" and r.lr == 1e-1 and r.depth == 2)]
    row = _claim(evidence.claims(one), "spannorm trains at LRs where Post-LN does not")
    assert row.verdict == "inconclusive" and "one witness run only" in row.numbers


def test_a_layer_with_one_of_its_two_gradient_norms_still_counts() -> None:
    # A Mamba or MLP-only layer records one of the two norms; a record with neither has none.
    assert evidence._grad({"attn_grad_norm": 3.0, "mlp_grad_norm": 4.0}) == 5.0
    assert evidence._grad({"mlp_grad_norm": 3.0}) == 3.0
    assert evidence._grad({"attn_grad_norm": 4.0, "mlp_grad_norm": None}) == 4.0
    assert evidence._grad({}) is None
    assert evidence._grad({"attn_grad_norm": None, "mlp_grad_norm": None}) is None


def test_a_truncated_token_index_is_named_not_a_struct_error(tmp_path: Path) -> None:
    from megaspan.report.stats import idx_dtype

    # Megatron's indexed-dataset header: magic, version <Q, dtype code <B; this one stops early.
    (tmp_path / "corpus.idx").write_bytes(b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little")[:4])
    with pytest.raises(ValueError, match=r"corpus\.idx is not a Megatron indexed-dataset index"):
        idx_dtype(tmp_path / "corpus")
    (tmp_path / "corpus.idx").write_bytes(b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + bytes([8]))
    assert idx_dtype(tmp_path / "corpus") == "uint16"

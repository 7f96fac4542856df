"""The LR x depth evidence: loss vs LR, LR sensitivity, best-LR results, ranking stability and
the claims table, computed from :class:`RunRecord` s (never written by hand).

Definitions (also in docs/evidence.md):

* a *group* is one (placement, variant, depth); its *cells* are its grid LRs, each with its seeds;
* a cell *trains* when every seed completed (not collapsed, not diverged); it *fails* when every
  seed diverged or collapsed; unfinished seeds (pending, failed, preempted) are left out;
* the group's *best LR* is the LR with the lowest mean final loss, over the seeds every LR has
  (the grid's), among LRs where no such seed diverged (:func:`megaspan.sweep.stages.best_lr`: the
  choice the sweep's stage 2 made before it added seeds there);
* the *best-LR loss* is the mean final validation loss over the seeds at the best LR with its
  95% t interval; the *depth gain* is l(deep) - l(shallow) between the best-LR losses (Welch);
* *LR sensitivity* is Wortsman et al.'s mean over the grid of min(l(eta), l0) - l*
  (:func:`megaspan.report.stats.lr_sensitivity`), l0 the step-0 validation loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from megaspan.report.collect import RunRecord, diagnostics_records, last_diagnostics
from megaspan.report.stats import (
    Interval,
    Sensitivity,
    compare,
    finite,
    kendall_tau,
    lr_sensitivity,
    t_interval,
    welch_interval,
)
from megaspan.sweep.stages import best_lr

FINISHED = ("completed", "collapsed", "diverged")
VANISH_RATIO = 1e-2
"""Early-layer gradients 'vanish' when their mean norm is below this fraction of the late layers'."""
INCONCLUSIVE, REPRODUCED, CONTRADICTED = "inconclusive", "reproduced", "contradicted"


@dataclass
class LRCell:
    lr: float
    runs: list[RunRecord]

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status in FINISHED]

    @property
    def trains(self) -> bool:
        done = self.finished
        return bool(done) and all(r.status == "completed" for r in done)

    @property
    def fails(self) -> bool:
        done = self.finished
        return bool(done) and all(r.status in ("diverged", "collapsed") for r in done)

    @property
    def losses(self) -> list[float | None]:
        """Final losses of the finished seeds; None for a diverged seed."""
        return [None if r.diverged else r.final_loss for r in self.finished]

    def mark(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for r in self.runs:
            counts[r.status] += 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


@dataclass
class Group:
    placement: str
    depth: int | None
    cells: dict[float, LRCell] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.placement

    @property
    def best_lr(self) -> float | None:
        """Chosen on the seeds every LR has (the grid's seed): the choice the sweep's stage 2 made
        before it added seeds at that LR. With all seeds, the extra seeds at the best LR could
        move its mean above another LR's single seed and the 'best' LR would flip after the fact
        (it did on cpu-proxy: HybridNorm at depth 24)."""
        cells = {lr: c for lr, c in self.cells.items() if c.finished}
        seed_sets = [{r.seed for r in c.finished} for c in cells.values()]
        common = set.intersection(*seed_sets) if seed_sets else set()
        if common:
            return best_lr(
                {
                    lr: [None if r.diverged else r.final_loss for r in c.finished if r.seed in common]
                    for lr, c in cells.items()
                }
            )
        return best_lr({lr: c.losses for lr, c in cells.items()})

    @property
    def best(self) -> Interval | None:
        lr = self.best_lr
        return None if lr is None else t_interval(self.cells[lr].losses)

    def best_losses(self) -> list[float]:
        lr = self.best_lr
        return [] if lr is None else finite(self.cells[lr].losses)

    def best_runs(self) -> list[RunRecord]:
        lr = self.best_lr
        return [] if lr is None else [r for r in self.cells[lr].finished if not r.diverged]

    @property
    def finished_any(self) -> bool:
        return any(c.finished for c in self.cells.values())

    @property
    def grid_done(self) -> bool:
        """Every LR of the group has a finished run and no run is still pending or unfinished."""
        return all(c.finished and len(c.finished) == len(c.runs) for c in self.cells.values())

    @property
    def l0(self) -> float | None:
        values = finite(r.initial_loss for c in self.cells.values() for r in c.runs)
        return sum(values) / len(values) if values else None

    @property
    def sensitivity(self) -> Sensitivity | None:
        l0 = self.l0
        if l0 is None:
            return None
        return lr_sensitivity({lr: c.losses for lr, c in self.cells.items() if c.finished}, l0)


def groups(runs: list[RunRecord]) -> list[Group]:
    """One group per (placement[/variant], depth) of the runs that have an LR."""
    out: dict[tuple, Group] = {}
    for r in runs:
        if r.lr is None:
            continue
        g = out.setdefault((r.placement, r.depth), Group(r.placement, r.depth))
        g.cells.setdefault(r.lr, LRCell(r.lr, [])).runs.append(r)
    return sorted(out.values(), key=lambda g: (g.placement, g.depth is None, g.depth or 0))


def has_lr_axis(runs: list[RunRecord]) -> bool:
    return len({r.lr for r in runs if r.lr is not None}) > 1


def grid(runs: list[RunRecord]) -> list[float]:
    return sorted({r.lr for r in runs if r.lr is not None})


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# --- tables --------------------------------------------------------------------------------------


def loss_vs_lr_table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Placement x depth rows, one column per grid LR: mean final loss over finished seeds, with
    the cell's mark (D = a seed diverged, C = a seed collapsed, * = the best LR)."""
    lrs = grid(runs)
    headers = ["placement", "depth", *(f"lr {lr:g}" for lr in lrs)]
    rows = []
    for g in groups(runs):
        best = g.best_lr
        row = [g.placement, str(g.depth)]
        for lr in lrs:
            cell = g.cells.get(lr)
            if cell is None or not cell.finished:
                row.append("missing" if cell is None else "unfinished")
                continue
            vals = finite(cell.losses)
            text = f"{sum(vals) / len(vals):.3f}" if vals else "-"
            marks = ("D" if any(r.diverged for r in cell.runs) else "") + (
                "C" if any(r.collapsed for r in cell.runs) else ""
            )
            row.append(text + (f" {marks}" if marks else "") + (" *" if lr == best else ""))
        rows.append(row)
    return headers, rows


def best_lr_table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Per placement: at each depth the best LR and its loss (95% t interval over seeds), the depth
    gain l(deep) - l(shallow) (Welch 95% interval), and the LR sensitivity at each depth."""
    by_p: dict[str, dict[int | None, Group]] = defaultdict(dict)
    for g in groups(runs):
        by_p[g.placement][g.depth] = g
    depths = sorted({g.depth for g in groups(runs) if g.depth is not None})
    headers = ["placement"]
    for d in depths:
        headers += [f"best lr L{d}", f"loss L{d} (95% CI)", f"LRS L{d}"]
    if len(depths) >= 2:
        headers.append(f"depth gain L{depths[-1]}-L{depths[0]} (95% CI)")
    rows = []
    for p in sorted(by_p):
        row = [p]
        for d in depths:
            g = by_p[p].get(d)
            if g is None:
                row += ["-", "missing", "-"]
                continue
            best, lrs = g.best, g.sensitivity
            if not g.finished_any:
                row += ["-", "not run yet", "-"]
                continue
            row += [
                "none" if g.best_lr is None else f"{g.best_lr:g}",
                "diverged at every LR" if best is None else best.text(),
                "-"
                if lrs is None
                else f"{lrs.value:.3f}" + ("" if lrs.lrs == len(grid(runs)) else f" ({lrs.lrs} LRs)"),
            ]
        if len(depths) >= 2:
            lo, hi = by_p[p].get(depths[0]), by_p[p].get(depths[-1])
            gain = welch_interval(hi.best_losses(), lo.best_losses()) if lo and hi else None
            row.append("-" if gain is None else gain.text())
        rows.append(row)
    return headers, rows


def ranking_table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Per depth: the placements ranked by best-LR validation loss at the last evaluated step N
    and at the evaluation nearest N/2 (best LR re-chosen at each), and Kendall's tau between the
    two rankings (1 = unchanged: the run is long enough for the ranking)."""
    headers = ["depth", "step", "ranking (best-LR validation loss, lowest first)", "Kendall tau vs N"]
    rows = []
    by_depth: dict[int | None, list[Group]] = defaultdict(list)
    for g in groups(runs):
        by_depth[g.depth].append(g)
    for depth, gs in sorted(by_depth.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        steps = sorted(
            {s for g in gs for c in g.cells.values() for r in c.finished for s, _ in r.curves.get("val", [])}
        )
        if not steps or steps[-1] == 0:
            continue
        n = steps[-1]
        half = min((s for s in steps if s > 0), key=lambda s: (abs(s - n / 2), s))
        rank_n = _ranking_at(gs, n)
        rank_half = _ranking_at(gs, half)
        tau = kendall_tau(rank_half, rank_n)
        for step, ranking in ((half, rank_half), (n, rank_n)):
            text = ", ".join(f"{p} {v:.3f}" for p, v in ranking.items())
            rows.append(
                [str(depth), str(step), text, ("-" if tau is None else f"{tau:.2f}") if step == half else "1"]
            )
    return headers, rows


def _ranking_at(gs: list[Group], step: int) -> dict[str, float]:
    scores = {}
    for g in gs:
        best = None
        for cell in g.cells.values():
            vals = []
            for r in cell.finished:
                if r.diverged:
                    vals = []
                    break
                point = dict(r.curves.get("val", [])).get(step)
                if point is not None and math.isfinite(point):
                    vals.append(point)
            if vals:
                mean = sum(vals) / len(vals)
                best = mean if best is None else min(best, mean)
        if best is not None:
            scores[g.placement] = best
    return dict(sorted(scores.items(), key=lambda kv: kv[1]))


# --- per-run mechanism metrics -------------------------------------------------------------------


def _layer_rows(record: dict) -> list[tuple[int, dict]]:
    return sorted(
        (int(k), v) for k, v in record.get("layers", {}).items() if k.isdigit() and isinstance(v, dict)
    )


def _grad(values: dict) -> float | None:
    a, m = values.get("attn_grad_norm"), values.get("mlp_grad_norm")
    if not isinstance(a, (int, float)) and not isinstance(m, (int, float)):
        return None
    return math.sqrt(float(a or 0.0) ** 2 + float(m or 0.0) ** 2)


def _quarter(n: int) -> int:
    return max(1, n // 4)


def late_angular_distance(run: RunRecord) -> float | None:
    """Mean angular distance over the last quarter of layers, at the end of training."""
    record = last_diagnostics(run.path)
    if record is None:
        return None
    rows = _layer_rows(record)
    vals = [v.get("angular_distance") for _, v in rows[-_quarter(len(rows)) :]]
    vals = [float(x) for x in vals if isinstance(x, (int, float))]
    return sum(vals) / len(vals) if vals else None


def first_diagnostics(run_dir) -> dict | None:
    records = diagnostics_records(run_dir)
    return records[0] if records else None


def early_late_grad_ratio(run: RunRecord) -> tuple[float, int] | None:
    """(mean gradient norm of the first quarter of layers / that of the last quarter, the step it
    was measured at): the profile at initialisation (a diagnostics record at step <= 1) when
    there is one, else the last record."""
    first = first_diagnostics(run.path)
    record = first if first is not None and int(first.get("step", 99)) <= 1 else last_diagnostics(run.path)
    if record is None:
        return None
    grads = [(i, _grad(v)) for i, v in _layer_rows(record)]
    grads = [(i, g) for i, g in grads if g is not None]
    if len(grads) < 2:
        return None
    q = _quarter(len(grads))
    early = sum(g for _, g in grads[:q]) / q
    late = sum(g for _, g in grads[-q:]) / q
    if late <= 0:
        return None
    return early / late, int(record.get("step", -1))


# --- claims --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    kind: str  # lower | le | trains_where | raises_angular | vanish
    a: str  # a placement label, or a prefix ending in * (spannorm*: every SpanNorm variant)
    b: str
    text: str
    depth: str = "deep"  # deep | each | any


CLAIMS = (
    Claim("lower", "spannorm*", "pre", "{a} reaches a lower loss than Pre-LN at the deep setting"),
    Claim("trains_where", "spannorm*", "post", "{a} trains at LRs where Post-LN does not", "any"),
    Claim("lower", "b2t", "post", "B2T reaches a lower loss than Post-LN at depth"),
    Claim("lower", "hybridnorm", "pre", "HybridNorm reaches a lower loss than Pre-LN", "each"),
    Claim("le", "hybridnorm_star", "hybridnorm", "HybridNorm* reaches a loss <= HybridNorm's", "each"),
    Claim("trains_where", "deepnorm", "post", "DeepNorm trains where Post-LN does not", "any"),
    Claim("raises_angular", "mixln", "pre", "Mix-LN raises Pre-LN's late-layer angular distance"),
    Claim("raises_angular", "lns", "pre", "LNS raises Pre-LN's late-layer angular distance"),
    Claim(
        "vanish", "post", "spannorm*", "Post-LN's early-layer gradients vanish at depth while {b}'s do not"
    ),
)


@dataclass
class ClaimRow:
    claim: str
    test: str
    numbers: str
    verdict: str

    def row(self) -> list[str]:
        return [self.claim, self.test, self.numbers, self.verdict]


def _expand(label: str, placements: set[str]) -> list[str]:
    if label.endswith("*"):
        return sorted(p for p in placements if p.split("/")[0].startswith(label[:-1]))
    return [label]


def claims(runs: list[RunRecord], specs: tuple[Claim, ...] = CLAIMS) -> list[ClaimRow]:
    gs = groups(runs)
    index = {(g.placement, g.depth): g for g in gs}
    placements = {g.placement for g in gs}
    depths = sorted({g.depth for g in gs if g.depth is not None})
    out: list[ClaimRow] = []
    for spec in specs:
        for a in _expand(spec.a, placements) or [spec.a.rstrip("*")]:
            for b in _expand(spec.b, placements) or [spec.b.rstrip("*")]:
                text = spec.text.format(a=a, b=b)
                if spec.depth == "any":
                    out.append(_trains_where(text, a, b, index, depths))
                    continue
                chosen = depths if spec.depth == "each" else depths[-1:]
                if not chosen:
                    out.append(ClaimRow(text, "-", "no runs with a depth", INCONCLUSIVE))
                for d in chosen:
                    ga, gb = index.get((a, d)), index.get((b, d))
                    label = f"{text} (L{d})" if spec.depth == "each" or len(depths) > 1 else text
                    if ga is None or gb is None:
                        missing = ", ".join(p for p, g in ((a, ga), (b, gb)) if g is None)
                        out.append(ClaimRow(label, "-", f"no runs of {missing} at depth {d}", INCONCLUSIVE))
                    elif spec.kind in ("lower", "le"):
                        out.append(_lower(label, ga, gb, spec.kind))
                    elif spec.kind == "raises_angular":
                        out.append(_raises_angular(label, ga, gb))
                    elif spec.kind == "vanish":
                        out.append(_vanish(label, ga, gb))
    return out


def claims_table(rows: list[ClaimRow]) -> tuple[list[str], list[list[str]]]:
    return ["claim", "test", "numbers", "verdict"], [r.row() for r in rows]


def _lower(text: str, a: Group, b: Group, kind: str) -> ClaimRow:
    test = (
        "best-LR final validation loss, 95% t intervals over seeds: reproduced if a's interval is "
        "wholly below b's, contradicted if wholly above, else inconclusive"
    )
    unrun = [g.placement for g in (a, b) if not g.finished_any]
    if unrun:
        return ClaimRow(
            text, test, f"no finished runs of {', '.join(unrun)} at depth {a.depth}", INCONCLUSIVE
        )
    ia, ib = a.best, b.best
    if ia is None or ib is None:
        none = [g.placement for g in (a, b) if g.best is None]
        numbers = f"no LR trained without divergence: {', '.join(none)}"
        if ia is None and ib is not None and ib.n >= 2 and a.grid_done:
            return ClaimRow(text, test, numbers + f"; {b.placement} {ib.text()}", CONTRADICTED)
        if not all(g.grid_done for g in (a, b)):
            numbers += " so far (grid unfinished)"
        return ClaimRow(text, test, numbers, INCONCLUSIVE)
    numbers = f"{a.placement} {ia.text()} at lr {a.best_lr:g}; {b.placement} {ib.text()} at lr {b.best_lr:g}"
    if min(ia.n, ib.n) < 2:
        return ClaimRow(text, test, numbers + "; fewer than 2 seeds", INCONCLUSIVE)
    side = compare(ia, ib)
    verdict = {"below": REPRODUCED, "above": CONTRADICTED}.get(side, INCONCLUSIVE)
    if side == "overlap":
        numbers += "; intervals overlap"
    return ClaimRow(text, test, numbers, verdict)


def _trains_where(text: str, a: str, b: str, index: dict, depths: list[int]) -> ClaimRow:
    test = (
        "over every (depth, LR) cell run for both: witnesses = a trains (all seeds completed, not "
        "collapsed) and b fails (all seeds diverged or collapsed); reproduced with >= 2 witness runs, "
        "contradicted if b fails somewhere and a fails wherever b does (>= 2 runs), else inconclusive"
    )
    witnesses, both_fail, b_fail = [], [], []
    for d in depths:
        ga, gb = index.get((a, d)), index.get((b, d))
        if ga is None or gb is None:
            continue
        for lr in sorted(set(ga.cells) & set(gb.cells)):
            ca, cb = ga.cells[lr], gb.cells[lr]
            n = min(len(ca.finished), len(cb.finished))
            if cb.fails:
                b_fail.append((d, lr))
                if ca.trains:
                    witnesses.append((d, lr, n))
                elif ca.fails:
                    both_fail.append((d, lr, n))
    if not any(index.get((a, d)) and index.get((b, d)) for d in depths):
        return ClaimRow(text, test, f"no depth with runs of both {a} and {b}", INCONCLUSIVE)
    where = lambda cells: ", ".join(f"L{d} lr {lr:g}" for d, lr, *_ in cells) or "none"  # noqa: E731
    numbers = f"{a} trains, {b} fails at: {where(witnesses)}; {b} fails at: {where(b_fail)}"
    if sum(n for *_, n in witnesses) >= 2:
        return ClaimRow(text, test, numbers, REPRODUCED)
    if b_fail and not witnesses and len(both_fail) == len(b_fail) and sum(n for *_, n in both_fail) >= 2:
        return ClaimRow(text, test, numbers + f"; {a} fails there too", CONTRADICTED)
    if not b_fail:
        numbers += f"; {b} fails at no LR of the grid (the grid does not reach its limit)"
    elif witnesses:
        numbers += "; one witness run only"
    return ClaimRow(text, test, numbers, INCONCLUSIVE)


def _raises_angular(text: str, a: Group, b: Group) -> ClaimRow:
    test = (
        "mean angular distance of the last quarter of layers at the end of training, per seed at "
        "each placement's best LR, 95% t intervals: reproduced if a's is wholly above b's"
    )
    unrun = [g.placement for g in (a, b) if not g.best_runs()]
    if unrun:
        return ClaimRow(
            text, test, f"no finished run at a best LR of {', '.join(unrun)} at depth {a.depth}", INCONCLUSIVE
        )
    va = [late_angular_distance(r) for r in a.best_runs()]
    vb = [late_angular_distance(r) for r in b.best_runs()]
    if not finite(va) or not finite(vb):
        missing = [g.placement for g, v in ((a, va), (b, vb)) if not finite(v)]
        return ClaimRow(
            text,
            test,
            f"no angular_distance in diagnostics.jsonl at the best LR of {', '.join(missing)} "
            "(set logging.diagnostics_interval)",
            INCONCLUSIVE,
        )
    ia, ib = t_interval(va), t_interval(vb)
    numbers = f"{a.placement} {ia.text(3)}; {b.placement} {ib.text(3)}"
    if min(ia.n, ib.n) < 2:
        return ClaimRow(text, test, numbers + "; fewer than 2 seeds", INCONCLUSIVE)
    side = compare(ia, ib)
    if side == "overlap":
        numbers += "; intervals overlap"
    return ClaimRow(text, test, numbers, {"above": REPRODUCED, "below": CONTRADICTED}.get(side, INCONCLUSIVE))


def _vanish(text: str, a: Group, b: Group) -> ClaimRow:
    test = (
        f"early/late gradient ratio (mean grad norm of the first vs the last quarter of layers; "
        f"at step <= 1 if recorded, else at the end), per seed at the best LR; vanishing = ratio "
        f"< {VANISH_RATIO:g}: reproduced if every seed of a vanishes and none of b's (>= 2 seeds each), "
        "contradicted if no seed of a vanishes or every seed of b does"
    )
    unrun = [g.placement for g in (a, b) if not g.best_runs()]
    if unrun:
        return ClaimRow(
            text, test, f"no finished run at a best LR of {', '.join(unrun)} at depth {a.depth}", INCONCLUSIVE
        )
    ra = [x for x in (early_late_grad_ratio(r) for r in a.best_runs()) if x is not None]
    rb = [x for x in (early_late_grad_ratio(r) for r in b.best_runs()) if x is not None]
    if not ra or not rb:
        missing = [g.placement for g, v in ((a, ra), (b, rb)) if not v]
        return ClaimRow(
            text,
            test,
            f"no per-layer gradient norms in diagnostics.jsonl at the best LR of {', '.join(missing)}",
            INCONCLUSIVE,
        )
    fmt = lambda rs: ", ".join(f"{x:.2e} (step {s})" for x, s in rs)  # noqa: E731
    numbers = f"{a.placement}: {fmt(ra)}; {b.placement}: {fmt(rb)}"
    if min(len(ra), len(rb)) < 2:
        return ClaimRow(text, test, numbers + "; fewer than 2 seeds", INCONCLUSIVE)
    va = [x < VANISH_RATIO for x, _ in ra]
    vb = [x < VANISH_RATIO for x, _ in rb]
    if all(va) and not any(vb):
        return ClaimRow(text, test, numbers, REPRODUCED)
    if not any(va) or all(vb):
        return ClaimRow(text, test, numbers, CONTRADICTED)
    return ClaimRow(text, test, numbers + "; seeds disagree", INCONCLUSIVE)

"""The report's figures (matplotlib, Agg backend: no display needed).

Each function returns a :class:`matplotlib.figure.Figure` (or None when there is nothing to
draw) so callers and tests can inspect it before :func:`save` writes the PNG.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines and Slurm nodes have no display

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from megaspan.report.collect import RunRecord, diagnostics_records, last_diagnostics  # noqa: E402
from megaspan.report.tables import fmt_lr, group_cells, mean_std  # noqa: E402

PROFILE_PANELS = (
    ("grad_norm", "gradient norm (attn+MLP)"),
    ("rms", "residual stream RMS"),
    ("token_cosine", "token-token cosine"),
    ("angular_distance", "angular distance in->out"),
)


def _colors(placements: list[str]) -> dict[str, str]:
    # tab10 up to 10 placements; beyond that tab20, so 11 placements do not share a colour.
    name, n = ("tab10", 10) if len(placements) <= 10 else ("tab20", 20)
    palette = matplotlib.colormaps[name]
    return {p: palette(i % n) for i, p in enumerate(placements)}


def val_loss_vs_depth(runs: list[RunRecord], lr: float | None) -> Figure | None:
    """Final validation loss vs depth at one LR: a line per placement (error bars over seeds);
    depths where a seed diverged get an x at the top of the axes, collapsed cells a hollow ring."""
    cells = [c for c in group_cells(runs) if c.lr == lr and c.depth is not None]
    if not cells:
        return None
    placements = sorted({c.placement for c in cells})
    colors = _colors(placements)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    finite = []
    diverged_x: list[tuple[str, int]] = []
    for p in placements:
        xs, ys, es = [], [], []
        for c in sorted((c for c in cells if c.placement == p), key=lambda c: c.depth):
            mean, std, _ = mean_std(c.losses("final_val_loss"))
            if c.diverged:
                diverged_x.append((p, c.depth))
            if mean is not None:
                xs.append(c.depth)
                ys.append(mean)
                es.append(std)
                finite.append(mean)
                if any(r.collapsed for r in c.runs):
                    ax.scatter([c.depth], [mean], s=110, facecolors="none", edgecolors=colors[p], zorder=4)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=p, color=colors[p])
    if diverged_x:
        top = max(finite) * 1.02 if finite else 1.0
        ax.scatter(
            [d for _, d in diverged_x],
            [top] * len(diverged_x),
            marker="x",
            s=60,
            c=[colors[p] for p, _ in diverged_x],
            label="diverged (a seed)",
            zorder=5,
        )
    ax.set_xscale("log", base=2)
    depths = sorted({c.depth for c in cells})
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"final validation loss vs depth (lr {fmt_lr(lr)}; mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Mean over seeds at each step (a step only some seeds reached averages those seeds)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, value in curve:
            by_step[step].append(value)
    steps = sorted(by_step)
    return steps, [sum(v) / len(v) for v in (by_step[s] for s in steps)]


def loss_curves(runs: list[RunRecord], depth: int | None) -> Figure | None:
    """Loss curves at one depth: a panel per LR, a line per placement (train solid, val dashed;
    mean over seeds)."""
    chosen = [r for r in runs if r.depth == depth and r.curves.get("train")]
    if not chosen:
        return None
    lrs = sorted({r.lr for r in chosen}, key=lambda x: (x is None, x or 0))
    placements = sorted({r.placement for r in chosen})
    colors = _colors(placements)
    fig = Figure(figsize=(6 * len(lrs), 4.5))
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    for ax, lr in zip(axes, lrs):
        finite = []
        for p in placements:
            group = [r for r in chosen if r.lr == lr and r.placement == p]
            if not group:
                continue
            steps, mean = _mean_curve([r.curves["train"] for r in group])
            ax.plot(steps, mean, color=colors[p], label=f"{p} (train)")
            finite += [v for v in mean if math.isfinite(v)]
            val = [r.curves["val"] for r in group if r.curves.get("val")]
            if val:
                vsteps, vmean = _mean_curve(val)
                ax.plot(vsteps, vmean, color=colors[p], linestyle="--", marker=".", label=f"{p} (val)")
        if finite:
            # A diverged run's loss explodes; clip the axis to what the healthy runs span.
            lo, hi = min(finite), sorted(finite)[int(0.98 * (len(finite) - 1))]
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.25 * (hi - lo + 1e-6))
        ax.set_title(f"depth {depth}, lr {fmt_lr(lr)}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _layer_values(record: dict, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for layer, values in sorted(record["layers"].items(), key=lambda kv: int(kv[0])):
        if not isinstance(values, dict):
            continue
        if key == "grad_norm":
            a, m = values.get("attn_grad_norm"), values.get("mlp_grad_norm")
            if a is None and m is None:
                continue
            value = math.sqrt((a or 0.0) ** 2 + (m or 0.0) ** 2)
        elif isinstance(values.get(key), (int, float)):
            value = float(values[key])
        else:
            continue
        xs.append(int(layer))
        ys.append(value)
    return xs, ys


def layer_profiles(
    runs: list[RunRecord], depth: int | None, lr: float | None, *, title: str | None = None
) -> Figure | None:
    """Per-layer profiles at the end of training (last diagnostics record of the lowest seed of
    each placement): gradient norm, residual RMS, token cosine, angular distance. ``lr=None``
    with runs from several LRs takes every run given (the caller chose them, e.g. best LRs)."""
    records: dict[str, dict] = {}
    for r in sorted(
        (r for r in runs if r.depth == depth and (r.lr == lr or title is not None)),
        key=lambda r: (r.seed is None, r.seed or 0),
    ):
        if r.placement in records:
            continue
        record = last_diagnostics(r.path)
        if record is not None:
            records[r.placement] = record
    if not records:
        return None
    placements = sorted(records)
    colors = _colors(placements)
    fig = Figure(figsize=(12, 7))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, PROFILE_PANELS):
        for p in placements:
            xs, ys = _layer_values(records[p], key)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    markersize=3,
                    color=colors[p],
                    label=f"{p} (step {records[p].get('step', '?')})",
                )
        if key == "grad_norm" and ax.lines:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title or f"per-layer profiles at the end of training: depth {depth}, lr {fmt_lr(lr)}")
    fig.tight_layout()
    return fig


def loss_vs_lr(runs: list[RunRecord]) -> Figure | None:
    """Final validation loss against LR (log x): a panel per depth, a line per placement (mean
    over finished seeds). Diverged cells: x at the top of the panel; collapsed cells: a hollow
    marker; the dashed line is the unigram entropy of the training data."""
    from megaspan.report.evidence import groups

    gs = [g for g in groups(runs) if g.depth is not None]
    if not gs:
        return None
    depths = sorted({g.depth for g in gs})
    placements = sorted({g.placement for g in gs})
    colors = _colors(placements)
    fig = Figure(figsize=(6.5 * len(depths), 5))
    axes = fig.subplots(1, len(depths), squeeze=False)[0]
    entropy = next((r.unigram_entropy for r in runs if r.unigram_entropy is not None), None)
    for ax, depth in zip(axes, depths):
        finite_ys: list[float] = []
        diverged: list[tuple[str, float]] = []
        for g in (g for g in gs if g.depth == depth):
            xs, ys = [], []
            for lr, cell in sorted(g.cells.items()):
                vals = [v for v in cell.losses if v is not None and math.isfinite(v)]
                if any(r.diverged for r in cell.runs):
                    diverged.append((g.placement, lr))
                if not vals:
                    continue
                mean = sum(vals) / len(vals)
                xs.append(lr)
                ys.append(mean)
                finite_ys.append(mean)
                if any(r.collapsed for r in cell.runs):
                    ax.scatter(
                        [lr], [mean], s=90, facecolors="none", edgecolors=colors[g.placement], zorder=4
                    )
            if xs:
                ax.plot(xs, ys, marker="o", markersize=4, color=colors[g.placement], label=g.placement)
        top = (max(finite_ys) if finite_ys else 1.0) + 0.05
        if diverged:
            ax.scatter(
                [lr for _, lr in diverged],
                [top] * len(diverged),
                marker="x",
                s=60,
                c=[colors[p] for p, _ in diverged],
                zorder=5,
            )
        if entropy is not None:
            ax.axhline(entropy, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss")
        ax.set_title(f"depth {depth}")
        ax.grid(alpha=0.3)
    with_lines = [ax for ax in axes if ax.lines]
    if with_lines:
        with_lines[0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        "final validation loss vs LR (mean over seeds); x = a seed diverged, hollow = collapsed, "
        "dashed = unigram entropy of the training data"
    )
    fig.tight_layout()
    return fig


KNOWN_LAYER_FIELDS = {
    "rms",
    "token_cosine",
    "angular_distance",
    "max_abs",
    "attn_grad_norm",
    "mlp_grad_norm",
    "attn_update_ratio",
    "mlp_update_ratio",
    "moe_tokens_per_expert",
    "moe_load_cv",
    "moe_router_entropy",
}


def mechanism_fields(records: list[dict]) -> tuple[list[str], list[str]]:
    """(per-layer numeric fields beyond the four profile panels' inputs, model-level numeric
    fields: the record's ``model`` object, e.g. ``lm_head_log_z``, ``relative_update``, and any
    top-level number but ``step``) found in diagnostics records: whatever the trainer recorded."""
    layer, top = set(), set()
    for record in records:
        top.update(model_values(record))
        for values in record.get("layers", {}).values():
            if isinstance(values, dict):
                for key, value in values.items():
                    if key not in KNOWN_LAYER_FIELDS and _number(value):
                        layer.add(key)
    return sorted(layer), sorted(top)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_values(record: dict) -> dict[str, float]:
    """A diagnostics record's model-level numbers (its ``model`` object and top-level numbers)."""
    out = {k: float(v) for k, v in record.items() if k not in ("step", "layers", "model") and _number(v)}
    model = record.get("model")
    if isinstance(model, dict):
        out.update({k: float(v) for k, v in model.items() if _number(v)})
    return out


def model_curves(runs: list[RunRecord], depth: int | None, fields: list[str], title: str) -> Figure | None:
    """Model-level diagnostics against step (log x), a panel per field, a line per placement (its
    lowest seed among ``runs``): e.g. the relative model update ||f(x; theta_t) - f(x; theta_0)|| /
    ||f(x; theta_0)|| (DeepNet's amplification signal) and the LM head's log-Z."""

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in sorted((r for r in runs if r.depth == depth), key=lambda r: (r.seed is None, r.seed or 0)):
        if r.placement in curves:
            continue
        points: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for record in diagnostics_records(r.path):
            for key, value in model_values(record).items():
                points[key].append((int(record.get("step", 0)), value))
        if points:
            curves[r.placement] = points
    if not curves or not fields:
        return None
    placements = sorted(curves)
    colors = _colors(placements)
    fig = Figure(figsize=(5.5 * len(fields), 4))
    axes = fig.subplots(1, len(fields), squeeze=False)[0]
    for ax, key in zip(axes, fields):
        for p in placements:
            pts = sorted(curves[p].get(key, []))
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", color=colors[p], label=p)
        ax.set_title(key)
        ax.set_xlabel("step")
        if ax.lines:
            ax.set_xscale("log")
            ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def mechanism_profiles(
    runs: list[RunRecord], depth: int | None, fields: list[str], title: str
) -> Figure | None:
    """One panel per extra per-layer diagnostics field (e.g. attention max logit / entropy), a line
    per placement, from the last record of each placement's lowest seed among ``runs``."""
    records: dict[str, dict] = {}
    for r in sorted((r for r in runs if r.depth == depth), key=lambda r: (r.seed is None, r.seed or 0)):
        if r.placement not in records and (rec := last_diagnostics(r.path)) is not None:
            records[r.placement] = rec
    if not records or not fields:
        return None
    placements = sorted(records)
    colors = _colors(placements)
    cols = min(3, len(fields))
    rows = math.ceil(len(fields) / cols)
    fig = Figure(figsize=(5.5 * cols, 4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, fields):
        for p in placements:
            xs, ys = _layer_values(records[p], key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, color=colors[p], label=p)
        ax.set_title(key)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(fields) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

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

from megaspan.report.collect import RunRecord, last_diagnostics  # noqa: E402
from megaspan.report.tables import fmt_lr, group_cells, mean_std  # noqa: E402

PROFILE_PANELS = (
    ("grad_norm", "gradient norm (attn+MLP)"),
    ("rms", "residual stream RMS"),
    ("token_cosine", "token-token cosine"),
    ("angular_distance", "angular distance in->out"),
)


def _colors(placements: list[str]) -> dict[str, str]:
    palette = matplotlib.colormaps["tab10"]
    return {p: palette(i % 10) for i, p in enumerate(placements)}


def val_loss_vs_depth(runs: list[RunRecord], lr: float | None) -> Figure | None:
    """Final validation loss vs depth at one LR: a line per placement (error bars over seeds);
    depths where a seed diverged get a red x at the top of the axes."""
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


def layer_profiles(runs: list[RunRecord], depth: int | None, lr: float | None) -> Figure | None:
    """Per-layer profiles at the end of training (last diagnostics record of the lowest seed of
    each placement): gradient norm, residual RMS, token cosine, angular distance."""
    records: dict[str, dict] = {}
    for r in sorted(
        (r for r in runs if r.depth == depth and r.lr == lr), key=lambda r: (r.seed is None, r.seed or 0)
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
    fig.suptitle(f"per-layer profiles at the end of training: depth {depth}, lr {fmt_lr(lr)}")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

"""``megaspan report``: turn run dirs / sweep dirs into report.md (or report.html) + PNG plots."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaspan.errors import ConfigError, RunDirError
from megaspan.report import evidence, plots
from megaspan.report.collect import (
    COLLAPSE_COSINE,
    COLLAPSE_MARGIN,
    RunRecord,
    collect,
    last_diagnostics,
    last_layer_cosine,
)
from megaspan.report.downstream import downstream_table
from megaspan.report.tables import Table, cells_table, fmt_lr, guard_events_table, stability_table

FORMATS = ("md", "html")


@dataclass
class Report:
    """What was written: the page, the PNGs, and the figures (kept for inspection)."""

    page: Path
    images: list[Path] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _config_blocks(runs: list[RunRecord]) -> tuple[dict[str, Any], list[str]]:
    """(keys equal in every run, keys that vary) over the runs' resolved configs."""
    flats = [_flatten(r.config) for r in runs if r.config]
    if not flats:
        return {}, []
    keys = sorted(set().union(*flats))
    common, varied = {}, []
    for key in keys:
        values = {json.dumps(f.get(key), sort_keys=True, default=str) for f in flats}
        if len(values) == 1:
            common[key] = flats[0].get(key)
        else:
            varied.append(key)
    return common, varied


def _versions(runs: list[RunRecord]) -> list[tuple[str, str]]:
    seen: dict[str, set[str]] = {}
    for r in runs:
        for key, value in ((r.summary or {}).get("versions") or {}).items():
            seen.setdefault(str(key), set()).add(str(value))
    return [(k, ", ".join(sorted(v))) for k, v in sorted(seen.items())]


def _md_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(
    paths: list[str | Path],
    out_dir: str | Path | None = None,
    fmt: str = "md",
    *,
    collapse_cosine: float | None = None,
) -> Report:
    """Read the runs under ``paths`` and write the report into ``out_dir`` (default: the first
    path's ``report/``). ``collapse_cosine``: also call a run collapsed when its last layer's
    token cosine exceeds this (see :func:`megaspan.report.collect.mark_collapsed`)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if collapse_cosine is not None and not 0 < collapse_cosine <= 1:
        raise ConfigError(f"--collapse-cosine must be in (0, 1], got {collapse_cosine}")
    runs = collect(list(paths), collapse_cosine)
    out = Path(out_dir) if out_dir is not None else Path(paths[0]) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the report dir {out}: {exc.strerror or exc}") from exc
    report = Report(page=out / f"report.{fmt}", runs=runs)

    blocks: list[tuple[str, Any]] = []  # (kind, payload), rendered as markdown or HTML below
    sweeps = sorted({r.sweep for r in runs if r.sweep})
    title = f"megaspan report: {', '.join(sweeps)}" if sweeps else "megaspan report"
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    blocks.append(
        (
            "p",
            f"{len(runs)} runs: "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + ". Sources: "
            + ", ".join(str(p) for p in paths)
            + ".",
        )
    )
    entropies = sorted({round(r.unigram_entropy, 4) for r in runs if r.unigram_entropy is not None})
    collapsed = [r for r in runs if r.collapsed]
    blocks.append(
        (
            "p",
            (
                "Unigram entropy of the training data (token counts of its .bin): "
                + ", ".join(f"{h:.4f}" for h in entropies)
                + " nats."
                if entropies
                else "Unigram entropy unknown (the runs do not record their training data): "
                "collapse is judged by the token cosine only."
            )
            + f" A completed run is `collapsed` when its final loss is not at least {COLLAPSE_MARGIN:g} "
            "nats below that entropy"
            + (
                f", or its last layer's token cosine exceeds {collapse_cosine:g}"
                if collapse_cosine is not None
                else " (the token-cosine rule is off: --collapse-cosine 0.99 turns it on)"
            )
            + f"; {len(collapsed)} of {len(runs)} runs are.",
        )
    )
    lr_axis = evidence.has_lr_axis(runs)
    if lr_axis:
        blocks.append(("h2", "Loss vs learning rate"))
        blocks.append(
            (
                "p",
                "Mean final validation loss over the finished seeds of each (placement, depth, LR); "
                "D = a seed diverged, C = a seed collapsed, * = the best LR (lowest mean loss among "
                "LRs where no seed diverged).",
            )
        )
        blocks.append(("table", evidence.loss_vs_lr_table(runs)))
        blocks.append(("figure", ("loss_vs_lr", plots.loss_vs_lr(runs), "final validation loss vs LR")))
        blocks.append(("h2", "Best-LR results and LR sensitivity"))
        blocks.append(
            (
                "p",
                "Best-LR loss: mean final validation loss over the seeds at the best LR with its 95% "
                "t interval. LRS (Wortsman et al. 2023): mean over the LR grid of min(l(eta), l0) - l*, "
                "l0 = the step-0 validation loss, l* = the best loss over the grid, a diverged seed "
                "counted as l0 (0 = every LR as good as the best). Depth gain: l(deep) - l(shallow) at "
                "each depth's best LR, 95% Welch interval (negative = depth helps).",
            )
        )
        blocks.append(("table", evidence.best_lr_table(runs)))
        ranking = evidence.ranking_table(runs)
        if ranking[1]:
            blocks.append(("h2", "Is the run long enough? Ranking at N vs N/2 steps"))
            blocks.append(
                (
                    "p",
                    "Placements ranked by best-LR validation loss at the last evaluation (N) and at the "
                    "evaluation nearest N/2 of the same runs (the LR schedule has not decayed there, so "
                    "N/2 is not a run of length N/2). Kendall tau 1 = the same order.",
                )
            )
            blocks.append(("table", ranking))
    scores = downstream_table(runs)
    if scores[1]:
        blocks.append(("h2", "Downstream tasks vs placement and depth"))
        blocks.append(
            (
                "p",
                "Final in-loop lm-eval scores (eval.downstream; each run's last scored step): the mean "
                "over the finished, not diverged seeds with its 95% t interval"
                + (", at each (placement, depth)'s best LR" if lr_axis else "")
                + ". Seeds: how many runs of the row recorded scores.",
            )
        )
        blocks.append(("table", scores))
    blocks.append(("h2", "Claims"))
    blocks.append(
        (
            "p",
            "Each row is computed from the runs above: the test applied, the numbers, and the verdict "
            "(reproduced / contradicted / inconclusive: intervals overlap, fewer than 2 seeds, or the "
            "data is missing).",
        )
    )
    blocks.append(("table", evidence.claims_table(evidence.claims(runs))))
    if collapsed:
        blocks.append(("h2", "Collapsed runs"))
        blocks.append(
            (
                "table",
                (
                    ["run", "why", "last-layer token cosine"],
                    [[r.name, r.collapse_reason, _fmt_cos(last_layer_cosine(r.path))] for r in collapsed],
                ),
            )
        )
    blocks.append(("h2", "Stability"))
    blocks.append(
        (
            "p",
            "Per placement and learning rate: the largest depth at which no seed diverged (and "
            "at least one completed), the depths where seeds diverged, the loss spikes the guard "
            "counted over all depths, and the final losses (mean ± sample std over the seeds, "
            "diverged seeds excluded) at that largest stable depth.",
        )
    )
    blocks.append(("table", stability_table(runs)))
    blocks.append(("h2", "All cells"))
    blocks.append(("table", cells_table(runs)))
    events = guard_events_table(runs)
    if events[1]:
        blocks.append(("h2", "Guard events"))
        blocks.append(("table", events))

    def add_figure(key: str, fig, caption: str) -> None:
        if fig is None:
            return
        path = plots.save(fig, out / f"{key}.png")
        report.images.append(path)
        report.figures[key] = fig
        blocks.append(("img", (path, caption)))

    for i, (kind, payload) in enumerate(blocks):
        if kind == "figure":  # figures made above, saved now that add_figure exists
            key, fig, caption = payload
            blocks[i] = ("skip", None)
            if fig is not None:
                path = plots.save(fig, out / f"{key}.png")
                report.images.append(path)
                report.figures[key] = fig
                blocks[i] = ("img", (path, caption))

    lrs = sorted({r.lr for r in runs}, key=lambda x: (x is None, x or 0))
    depths = sorted({r.depth for r in runs}, key=lambda x: (x is None, x or 0))
    blocks.append(("h2", "Final validation loss vs depth"))
    for lr in lrs:
        add_figure(
            f"val_loss_vs_depth_lr{fmt_lr(lr)}",
            plots.val_loss_vs_depth(runs, lr),
            f"final validation loss vs depth, lr {fmt_lr(lr)}; x = a seed diverged, ring = collapsed",
        )
    blocks.append(("h2", "Loss curves"))
    for depth in depths:
        add_figure(
            f"loss_curves_L{depth}",
            plots.loss_curves(runs, depth),
            f"loss curves at depth {depth} (mean over seeds; dashed = validation)",
        )
    blocks.append(("h2", "Per-layer profiles at the end of training"))
    before = len(report.images)
    if lr_axis:
        # One figure per depth at each placement's best LR (not one per LR: the grid is wide).
        best_runs = [r for g in evidence.groups(runs) for r in g.best_runs()]
        for depth in depths:
            add_figure(
                f"layer_profiles_L{depth}_best_lr",
                plots.layer_profiles(
                    best_runs,
                    depth,
                    None,
                    title=f"per-layer profiles at each placement's best LR, depth {depth}",
                ),
                f"per-layer profiles, depth {depth}, each placement at its best LR",
            )
    else:
        best_runs = runs
        for depth in depths:
            for lr in lrs:
                add_figure(
                    f"layer_profiles_L{depth}_lr{fmt_lr(lr)}",
                    plots.layer_profiles(runs, depth, lr),
                    f"per-layer profiles, depth {depth}, lr {fmt_lr(lr)}",
                )
    if len(report.images) == before:
        blocks.append(("p", "No diagnostics.jsonl in these runs (set logging.diagnostics_interval)."))
    else:
        records = [rec for r in best_runs if (rec := last_diagnostics(r.path)) is not None]
        layer_fields, top_fields = plots.mechanism_fields(records)
        blocks.append(("h2", "Mechanism metrics"))
        if layer_fields:
            for depth in depths:
                add_figure(
                    f"mechanism_L{depth}",
                    plots.mechanism_profiles(
                        best_runs, depth, layer_fields, f"mechanism metrics per layer, depth {depth}"
                    ),
                    f"per-layer mechanism metrics ({', '.join(layer_fields)}), depth {depth}",
                )
        if top_fields:
            for depth in depths:
                add_figure(
                    f"model_metrics_L{depth}",
                    plots.model_curves(
                        best_runs, depth, top_fields, f"model-level metrics vs step, depth {depth}"
                    ),
                    f"model-level diagnostics ({', '.join(top_fields)}) vs step, depth {depth}",
                )
            blocks.append(("p", "Model-level diagnostics at the end of training (mean over the seeds):"))
            blocks.append(("table", _scalar_table(best_runs, top_fields)))
        if not layer_fields and not top_fields:
            blocks.append(
                (
                    "p",
                    "No mechanism fields beyond the per-layer profiles above in these runs' "
                    "diagnostics.jsonl (attention logits and entropy, log-Z, relative update are "
                    "plotted when the trainer records them); skipped.",
                )
            )

    blocks.append(("h2", "Config and versions"))
    common, varied = _config_blocks(runs)
    if varied:
        blocks.append(("p", "Keys that vary between runs: " + ", ".join(varied) + "."))
    if common:
        blocks.append(("pre", "\n".join(f"{k}: {json.dumps(v, default=str)}" for k, v in common.items())))
    versions = _versions(runs)
    if versions:
        blocks.append(("table", (["package", "version"], [list(v) for v in versions])))
    else:
        blocks.append(("p", "No versions recorded (the runs have no summary.json)."))

    report.page.write_text(_render_md(title, blocks, out) if fmt == "md" else _render_html(title, blocks))
    return report


def _fmt_cos(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" (> {COLLAPSE_COSINE:g})" if value > COLLAPSE_COSINE else "")


def _scalar_table(runs: list[RunRecord], fields: list[str]) -> Table:
    """Top-level diagnostics scalars (e.g. log-Z) of the last record, mean over each group's seeds."""
    rows: dict[tuple, list[dict]] = {}
    for r in runs:
        record = last_diagnostics(r.path)
        if record is not None:
            rows.setdefault((r.placement, r.depth, r.lr), []).append(record)
    headers = ["placement", "depth", "lr", *fields]
    out = []
    for (p, d, lr), recs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        cells = []
        for f in fields:
            vals = [v[f] for v in (plots.model_values(x) for x in recs) if f in v]
            cells.append(f"{sum(vals) / len(vals):.4g}" if vals else "-")
        out.append([p, str(d), fmt_lr(lr), *cells])
    return headers, out


def _render_md(title: str, blocks: list[tuple[str, Any]], out: Path) -> str:
    parts = [f"# {title}"]
    for kind, payload in blocks:
        if kind == "h2":
            parts.append(f"## {payload}")
        elif kind == "p":
            parts.append(payload)
        elif kind == "table":
            parts.append(_md_table(payload))
        elif kind == "pre":
            parts.append(f"```\n{payload}\n```")
        elif kind == "img":
            path, caption = payload
            parts.append(f"![{caption}]({path.relative_to(out)})")
    return "\n\n".join(parts) + "\n"


def _render_html(title: str, blocks: list[tuple[str, Any]]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for kind, payload in blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(payload)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(payload)}</p>")
        elif kind == "table":
            parts.append(_html_table(payload))
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(payload)}</pre>")
        elif kind == "img":
            path, caption = payload
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )

"""``<run_dir>/summary.json``: how the run ended, written at the end, on a stop (signal, guard)
and on an error. Schema (one object)::

    {"status": "completed|diverged|preempted|failed", "steps": int, "tokens": int,
     "wall_time_s": float, "tokens_per_s": float, "final_train_loss": float|null,
     "final_val_loss": float|null, "best_val_loss": float|null, "loss_spikes": int,
     "initial_val_loss": float|null, "guard_events": [{"step", "kind", "reason", "action"}],
     "diagnostics": {...}|null, "config": {...}, "versions": {...},
     "data": {"train": [prefix, ...], "valid": [...]},
     "downstream": {"<step>": {"<task>": {"<metric>": float}}}}  # only with eval.downstream.tasks

``diagnostics``: the mechanism metrics of :class:`megaspan.training.diagnostics.DiagnosticsHook`
(null without ``logging.diagnostics_interval``). ``initial_val_loss`` is the validation loss at
step 0, before any update (the loss at initialisation that LR sensitivity caps a diverged run
at); ``data`` names the .bin/.idx prefixes the run read, so a report can compute the training
data's unigram entropy. ``downstream``: the in-loop lm-eval scores
(:class:`megaspan.training.callbacks.downstream.DownstreamHook`) by step (a JSON string key),
task and metric (``acc``, ``acc_norm``, ``bits_per_byte``...; a metric of a filter other than
lm-eval's ``none`` keeps its ``,filter`` suffix); the last step is the run's final score.

``final_train_loss`` is the mean of the last ``window`` step losses (steps whose update was
dropped left out); ``loss_spikes`` counts steps
whose loss exceeded ``training.guard.spike_factor`` x the rolling median (whether or not a guard
acts on them). Losses are read only when another hook already brought them to the host (log
steps), so the summary adds no host sync. ``tokens`` and ``best_val_loss`` cover the whole run
across resumes (the previous summary of the run dir is read at start).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch.distributed as dist

from megaspan.training.callbacks.guard import SpikeDetector
from megaspan.training.hooks import Hook, StepResult
from megaspan.training.rundir import guarded, write_atomic

SUMMARY_FILE = "summary.json"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None  # JSON has no NaN


def _merged(previous: dict | None, now: dict | None) -> dict | None:
    """The diagnostics summary across resumes: this session's values win, the earlier sessions'
    keys (the step-1 gradient profile, earlier relative updates) are kept."""
    if not previous and not now:
        return None
    out = dict(previous or {})
    for key, value in (now or {}).items():
        out[key] = (
            {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


class SummaryHook(Hook):
    def __init__(self, run_dir: Path, guard, window: int = 20) -> None:
        self.path = run_dir / SUMMARY_FILE
        self.window = window
        self.spikes = SpikeDetector(guard.spike_factor, guard.window, guard.warmup_steps)
        self.spike_count = 0
        self.unread: list[StepResult] = []
        self.last_losses: list[float] = []
        self.step_time = 0.0
        self.session_tokens = 0
        self.started = time.monotonic()
        self.previous: dict = {}
        self.config: dict = {}
        self.versions: dict = {}
        self.data: dict = {}

    def on_fit_start(self, trainer) -> None:
        self.started = time.monotonic()
        resolved = getattr(trainer, "resolved", None) or {}
        self.config, self.versions = resolved.get("config", {}), resolved.get("versions", {})
        self.data = resolved.get("data") or {}
        if trainer.progress.step > 0:
            try:
                self.previous = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.previous = {}
            self.spike_count = int(self.previous.get("loss_spikes", 0))

    def on_step_end(self, trainer, result: StepResult) -> None:
        self.step_time += result.step_time_s
        self.session_tokens += result.tokens
        self.unread.append(result)
        if result.reduced.synced:  # a log step (or a guard) read this one: the older ones too
            self._read()

    def _read(self) -> None:
        for r in self.unread:
            loss = r.loss
            if math.isfinite(loss) and self.spikes.is_spike(r.step, loss) is not None:
                self.spike_count += 1
            elif math.isfinite(loss):
                self.spikes.accept(loss)
            if not r.skipped:  # a dropped update (guard skip) is not part of the trained model
                self.last_losses = (self.last_losses + [loss])[-self.window :]
        self.unread = []

    def on_fit_end(self, trainer) -> None:
        stop = trainer.stop
        self.write(trainer, "completed" if stop is None else stop.status)

    def on_error(self, trainer, exc: BaseException) -> None:
        status = "preempted" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            self.write(trainer, status)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def write(self, trainer, status: str) -> None:
        self._read()  # at the end, read what no log step did (one sync, once)
        vals = [v for _, v in trainer.val_losses]
        best = [v for v in vals + [self.previous.get("best_val_loss")] if v is not None and math.isfinite(v)]
        tokens = trainer.progress.consumed_samples * trainer.cfg.model.seq_length
        summary = {
            "status": status,
            "steps": trainer.progress.step,
            "tokens": tokens,
            "wall_time_s": round(time.monotonic() - self.started + self.previous.get("wall_time_s", 0.0), 3),
            "tokens_per_s": self.session_tokens / self.step_time if self.step_time > 0 else 0.0,
            "final_train_loss": _finite(sum(self.last_losses) / len(self.last_losses))
            if self.last_losses
            else None,
            "final_val_loss": _finite(vals[-1]) if vals else self.previous.get("final_val_loss"),
            "best_val_loss": min(best) if best else None,
            "initial_val_loss": _finite(vals[0])
            if trainer.val_losses and trainer.val_losses[0][0] == 0
            else self.previous.get("initial_val_loss"),
            "loss_spikes": self.spike_count,
            "guard_events": self.previous.get("guard_events", []) + trainer.events,
            "diagnostics": _merged(self.previous.get("diagnostics"), getattr(trainer, "diagnostics", None)),
            "config": self.config,
            "versions": self.versions,
            "data": self.data,
        }
        named = {
            name: {"final_loss": _finite(losses[-1][1]), "best_loss": min(v for _, v in losses)}
            for name, losses in trainer.named_val_losses.items()
            if losses
        }
        if named or "valid_sets" in self.previous:
            summary["valid_sets"] = {**self.previous.get("valid_sets", {}), **named}
        downstream = {
            **(self.previous.get("downstream") or {}),
            **{
                str(step): {
                    task: {m: _finite(v) for m, v in metrics.items()} for task, metrics in scores.items()
                }
                for step, scores in getattr(trainer, "downstream", {}).items()
            },
        }
        if downstream:
            summary["downstream"] = dict(sorted(downstream.items(), key=lambda kv: int(kv[0])))
        if "eval" in self.previous:  # megaspan eval's scores of this run's checkpoints
            summary["eval"] = self.previous["eval"]
        if not dist.is_initialized() or dist.get_rank() == 0:
            text = json.dumps(summary, indent=1, default=str) + "\n"
            guarded(self.path, lambda: write_atomic(self.path, text))

"""Training logs: one console/file line per log interval, TensorBoard and W&B scalars (rank 0 only).

Console line format (tests and scripts parse it; keep the prefix stable)::

    step N/M | loss X.XXXXXX | lr ... | grad_norm ... | tokens/s ... | mem ... | eta ... [| mfu ...] | P% [###...]
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megaspan.training.rundir import FS_ERRNOS, fs_error, guarded

LOGGER_NAME = "megaspan.train"

# Dense bf16 tensor-core peaks, for the MFU estimate (GPU only).
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


class _StrictFileHandler(logging.FileHandler):
    """A full disk or a revoked permission stops the run with one line naming ``train.log``,
    instead of logging's traceback per line and a run that trains on without its log."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno in FS_ERRNOS:
            raise fs_error(exc, self.baseFilename) from None
        super().handleError(record)


def setup_logger(log_file: Path | None) -> logging.Logger:
    """Console (stdout) + ``train.log``, message-only so the console format is exact."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(_StrictFileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def memory_bytes() -> int:
    """Peak allocated on GPU; current resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def format_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(num_params: int, num_layers: int, hidden: int, seq_length: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus causal attention scores (PaLM appendix B)."""
    return 6.0 * num_params + 6.0 * num_layers * hidden * seq_length


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    loss_scale: float | None


class MetricsLogger:
    """Formats, prints and records metrics. Construct on every rank; only rank 0 writes."""

    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        run_dir: Path | None,
        tensorboard: bool,
        progress_bar: bool,
        flops_per_token: float | None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress_bar = progress_bar
        self.flops_per_token = flops_per_token
        self.run_dir = run_dir
        self.tensorboard = enabled and tensorboard and run_dir is not None
        log_file = run_dir / "train.log" if enabled and run_dir else None
        self.logger = guarded(log_file, lambda: setup_logger(log_file))
        self.writer = None
        self.wandb = None  # a WandbWriter once start_wandb ran (rank 0, logging.wandb on)

    def start_wandb(self, cfg, config: dict, *, resumed: bool) -> None:
        """Open the W&B run (``cfg``: :class:`~megaspan.config.schema.WandbConfig`) with the
        run's resolved ``config``; ``resumed``: continue the run dir's W&B run id."""
        from megaspan.training.wandb_log import WandbWriter, effective_mode

        if not self.enabled or self.run_dir is None or self.wandb is not None or effective_mode(cfg) is None:
            return
        self.wandb = WandbWriter(cfg, self.run_dir, config, resumed=resumed)

    def start_tensorboard(self, purge_after: int | None) -> None:
        """Open the TensorBoard writer. ``purge_after``: the step a run resumed from; events of
        later steps (written by the run before its crash, and about to be redone) are hidden."""
        if not self.tensorboard or self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events with step >= it; a fresh start (None) in a used run dir has
        # redone everything, so it hides them all.
        purge = 0 if purge_after is None else purge_after + 1
        log_dir = self.run_dir / "tensorboard"
        self.writer = guarded(log_dir, lambda: SummaryWriter(log_dir=str(log_dir), purge_step=purge))

    def info(self, message: str) -> None:
        if self.enabled:
            self.logger.info(message)

    def error(self, message: str) -> None:
        """A one-line error on rank 0 (stderr and ``train.log``)."""
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def train_step(self, stats: StepStats, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        mem = memory_bytes()
        eta = format_duration(seconds_per_step * (self.total_steps - stats.step))
        grad_norm = "n/a" if stats.grad_norm is None else f"{stats.grad_norm:.4f}"
        parts = [
            f"step {stats.step}/{self.total_steps}",
            f"loss {stats.loss:.6f}",
            f"lr {stats.lr:.4e}",
            f"grad_norm {grad_norm}",
            f"tokens/s {stats.tokens_per_s:.0f}",
            f"mem {mem / 2**30:.2f}GiB",
            f"eta {eta}",
        ]
        mfu = self._mfu(stats.tokens_per_s)
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        if stats.loss_scale is not None:
            parts.append(f"loss_scale {stats.loss_scale:.0f}")
        if self.progress_bar:
            parts.append(self._progress(stats.step))
        self.logger.info(" | ".join(parts))
        scalars = {
            "train/loss": stats.loss,
            "train/lr": stats.lr,
            "train/tokens_per_s": stats.tokens_per_s,
            "train/mem_gib": mem / 2**30,
        }
        if stats.grad_norm is not None:
            scalars["train/grad_norm"] = stats.grad_norm
        if stats.loss_scale is not None:
            scalars["train/loss_scale"] = stats.loss_scale
        if mfu is not None:
            scalars["train/mfu"] = mfu
        self._scalars(scalars, stats.step)

    def validation(self, step: int, loss: float, name: str | None = None) -> None:
        """The main validation loss (``valid/loss``), or a named ``data.valid_sets`` one
        (``valid/<name>/loss``)."""
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))  # exp overflows for a diverged run; cap it
        tag = "valid" if name is None else f"valid/{name}"
        self.logger.info(f"{tag} loss {loss:.6f} | ppl {ppl:.3f} | step {step}")
        self._scalars({f"{tag}/loss": loss, f"{tag}/ppl": ppl}, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def scalars(self, scalars: dict[str, float], step: int) -> None:
        """TensorBoard and W&B only (e.g. per-layer diagnostics, too many for the console)."""
        self._scalars(scalars, step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(scalars, step)
        if self.writer is None:
            return
        path = self.run_dir / "tensorboard"

        def write() -> None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

        guarded(path, write)

    def _mfu(self, tokens_per_s: float) -> float | None:
        peak = peak_flops()
        if peak is None or self.flops_per_token is None:
            return None
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return tokens_per_s * self.flops_per_token / (peak * world)

    def _progress(self, step: int, width: int = 20) -> str:
        frac = step / max(1, self.total_steps)
        filled = int(width * frac)
        return f"{100 * frac:3.0f}% [{'#' * filled}{'.' * (width - filled)}]"

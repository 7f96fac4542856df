"""Weights & Biases logging (``logging.wandb``), online or offline, beside TensorBoard.

Decisions, and why:

* **Rank 0 writes**, the rank that writes ``train.log`` and TensorBoard. Megatron-LM logs W&B on
  the last rank because its loss lives on the last pipeline stage; megaspan all-reduces each
  step's loss to every rank, so rank 0 holds exactly the values TensorBoard gets and one process
  owns every sink of the run.
* **Same scalars as TensorBoard** (train/*, valid/*, the per-layer diagnostics): every scalar
  the :class:`~megaspan.training.metrics.MetricsLogger` writes goes to both, with the optimizer
  step as W&B's ``step``. The run's resolved config (and tokenizer hash, world layout, versions)
  is the W&B run config.
* **Resume continues the run**: the run id is stored in ``<run_dir>/wandb_run_id``; a run that
  resumes from a checkpoint reopens that id (``resume="allow"``), so offline runs synced later
  (``wandb sync``) land in one W&B run. A fresh start in a used run dir gets a new id, as its
  TensorBoard events are hidden. W&B keeps the first value of a step, so steps redone after a
  crash (logged before it, beyond the last checkpoint) keep their first values there.
* **Never a hang**: the ``wandb`` package missing, or ``online`` mode with the W&B server
  unreachable (a TCP probe of ``WANDB_BASE_URL``'s host, or of the HTTPS proxy, with a
  :data:`PROBE_TIMEOUT_S` timeout), is one line before the model is built. ``WANDB_MODE`` in the
  environment overrides ``logging.wandb.mode``, so a compute node without network can run
  ``WANDB_MODE=offline`` without editing the config.
"""

from __future__ import annotations

import os
import secrets
import socket
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from megaspan.errors import ConfigError

if TYPE_CHECKING:
    from megaspan.config.schema import WandbConfig

RUN_ID_FILE = "wandb_run_id"
PROBE_TIMEOUT_S = 5.0
_MODES = ("online", "offline", "disabled")


def effective_mode(cfg: WandbConfig) -> str | None:
    """``online``/``offline`` when W&B logging is on (``project`` set, not disabled), else None."""
    mode = os.environ.get("WANDB_MODE") or cfg.mode
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in _MODES:
        raise ConfigError(f"WANDB_MODE={mode!r} is not one of {', '.join(_MODES)}; unset it or fix it")
    if cfg.project is None or mode == "disabled":
        return None
    return mode


def check(cfg: WandbConfig) -> None:
    """Fail now, in one line, if W&B logging cannot start (before any model is built)."""
    mode = effective_mode(cfg)
    if mode is None:
        return
    _import_wandb()
    if mode == "online":
        host, port = _server()
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            raise ConfigError(
                f"logging.wandb.mode=online but the W&B server {host}:{port} is unreachable "
                f"({err.strerror or err}); log offline with logging.wandb.mode=offline (or "
                f"WANDB_MODE=offline) and upload later with `wandb sync <run_dir>/wandb/offline-run-*`"
            ) from None


class WandbWriter:
    """One W&B run of a megaspan run dir (rank 0 only)."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], *, resumed: bool) -> None:
        wandb = _import_wandb()
        mode = effective_mode(cfg)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        if not run_id:
            # W&B's own id alphabet and length (lowercase letters and digits, 8).
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            tmp = id_file.with_name(f".{id_file.name}.tmp")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, id_file)
        directory = Path(cfg.dir) if cfg.dir else run_dir
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_dir.name,
                group=cfg.group,
                tags=list(cfg.tags) or None,
                mode=mode,
                dir=str(directory),
                id=run_id,
                resume="allow",
                config=config,
                # Console capture would duplicate train.log; system stats are a thread per run.
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, init_timeout=90),
            )
        except wandb.errors.Error as err:
            raise ConfigError(f"W&B could not start a run: {str(err).splitlines()[0]}") from None
        self.run_id = run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "logging.wandb.project is set but the wandb package is not installed: "
            "pip install 'megaspan[wandb]', or unset logging.wandb.project"
        ) from None
    return wandb


def _server() -> tuple[str, int]:
    """The host and port an online run first connects to: the HTTPS proxy if one is set."""
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    url = urlsplit(base)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if url.scheme == "https" and proxy:
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default = 443 if url.scheme == "https" else 80
    return url.hostname or "api.wandb.ai", url.port or default

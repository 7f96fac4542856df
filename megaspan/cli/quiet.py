"""Known third-party console noise, filtered once at the ``megaspan`` entry point.

Every ``megaspan train`` used to print Megatron-Core's own deprecation and experimental notices
between megaspan's lines. None of them is about the user's run: each is a message Megatron prints
to every caller of an API megaspan uses on purpose (below, with the reason). They are listed
here, one entry each, and nowhere else; :func:`install` hides exactly these (matched by the
start of the message, so a different message from the same library still shows) and nothing
that megaspan itself says.

``megaspan --verbose ...`` or ``MEGASPAN_VERBOSE=1`` shows them all again.

To silence a new message: add one :class:`Noise` entry with the start of the message, where it
comes from, and why it is safe to hide. To find them: ``megaspan train --config tiny
training.steps=6 schedule.warmup_steps=2 --verbose`` and read stderr.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Noise:
    """One known third-party message."""

    starts_with: str
    """The start of the message text (matched literally, case-sensitively)."""
    via: Literal["warnings", "logging"]
    """``warnings.warn`` (filtered by message) or a ``logging`` record (filtered on ``logger``)."""
    source: str
    """Where it comes from: the module that warns, or the logger's name."""
    why: str
    """Why hiding it loses nothing."""


NOISE: tuple[Noise, ...] = (
    Noise(
        "GPTModel IS DEPRECATED",
        "logging",
        "megatron.core.models.gpt.gpt_model",
        "logged once per built GPTModel (per virtual pipeline chunk); megaspan builds GPTModel "
        "on purpose (Megatron-Core 0.19's dense/MoE decoder) and the notice is about future "
        "Megatron features, not this run",
    ),
    Noise(
        "MCore's async save is deprecated",
        "logging",
        "megatron.core.dist_checkpointing.strategies.torch",
        "logged by Megatron's asynchronous torch_dist save path at the first save; the notice "
        "advertises another library (NVRx). megaspan's writer is synchronous today; the entry "
        "stays so an async save does not bring the notice back",
    ),
    Noise(
        "MimoModelConfig is experimental",
        "warnings",
        "megatron.core.models.mimo.config.base_configs",
        "emitted at import of a Megatron module megaspan never uses (multimodal MIMO models), "
        "pulled in by megatron.core's own imports",
    ),
    Noise(
        "full scope is deprecated",
        "warnings",
        "megatron.core.transformer.transformer_config",
        "emitted by every TransformerConfig built with Megatron's own default CUDA-graph scope; "
        "megaspan does not capture CUDA graphs",
    ),
    Noise(
        "Transformer Engine and Apex are not installed",
        "warnings",
        "megatron.core.optimizer",
        "on a machine without TE/Apex, Megatron falls back to torch's AdamW/clip-grad; "
        "`megaspan info` reports which backend is installed, and asking for TE without it is "
        "a one-line error",
    ),
    Noise(
        "The argument order of load has been changed",
        "warnings",
        "torch.distributed.checkpoint.utils (_api_bc_check), called by "
        "megatron.core.dist_checkpointing.strategies.torch (TorchDistLoadShardedStrategy.load)",
        "emitted at every resume because Megatron passes its storage reader to torch DCP's load "
        "positionally; torch maps it to storage_reader itself and loads the same, and the notice "
        "asks Megatron's code, not the user, to change the call",
    ),
    Noise(
        "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load",
        "warnings",
        "torch.distributed.checkpoint.state_dict_loader, called by "
        "megatron.core.dist_checkpointing.strategies.torch (TorchDistLoadShardedStrategy.load)",
        "emitted (twice) at every resume because Megatron loads with no_dist=True on purpose: each "
        "rank reads the shards it owns without collectives; the process group is up and the "
        "resume is distributed as configured",
    ),
    Noise(
        "Apex is not installed",
        "warnings",
        "megatron.core.models (layer specs)",
        "Megatron's norm fallback to torch; megaspan builds its norms itself",
    ),
)
"""The documented list. Keep it short: every entry hides a message for every user."""

QUIET_LOGGERS: dict[str, int] = {
    # "No CUDA runtime is found" when torch's C++ extension helper is imported on a CPU machine.
    "torch.utils.cpp_extension": logging.ERROR,
}
"""Loggers whose INFO/WARNING records only restate the environment (``megaspan info`` says it)."""


class _DropKnown(logging.Filter):
    """A logging filter dropping records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to hide
            return True
        return not message.startswith(self.prefixes)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def install(*, verbose: bool = False) -> None:
    """Hide :data:`NOISE`; the CLI calls this once per process. ``verbose=True`` hides nothing
    (and takes back the logging filters of an earlier call in the same process)."""
    for logger, filt in _installed:
        logger.removeFilter(filt)
    _installed.clear()
    if verbose:
        return
    for noise in NOISE:
        if noise.via == "warnings":
            # warnings' message field is a regex matched at the start of the text.
            warnings.filterwarnings("ignore", message=re.escape(noise.starts_with))
    by_logger: dict[str, list[str]] = {}
    for noise in NOISE:
        if noise.via == "logging":
            by_logger.setdefault(noise.source, []).append(noise.starts_with)
    # Logger filters apply where a record is created, so they sit on the emitting module's logger
    # (getLogger creates it now; Megatron's getLogger(__name__) returns the same object later).
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        filt = _DropKnown(tuple(prefixes))
        logger.addFilter(filt)
        _installed.append((logger, filt))
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)

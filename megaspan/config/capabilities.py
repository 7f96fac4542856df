"""What the machine can run, as a plain value: the input to the backend checks of ``validate``.

``megaspan.models.detect_capabilities()`` fills it in (it imports torch and Transformer Engine);
the config package only reads it, so validation stays torch-free and tests can ask "what if this
were an H100 without TE?" by constructing one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    cuda: bool = False
    """A CUDA device is usable."""
    te: bool = False
    """Transformer Engine imports (Megatron's ``HAVE_TE``)."""
    te_version: str | None = None
    device_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    """(major, minor) of the current CUDA device, e.g. (9, 0) for H100."""

    def impl(self, requested: str) -> str:
        """``model.transformer_impl`` as it resolves on this machine: 'auto' is Transformer Engine
        when TE imports and CUDA is present, else the local backend."""
        if requested == "auto":
            return "transformer_engine" if self.te and self.cuda else "local"
        return requested

    @classmethod
    def cpu(cls) -> Capabilities:
        """A machine without CUDA or Transformer Engine."""
        return cls()

    @classmethod
    def gpu(cls) -> Capabilities:
        """Some CUDA GPU with Transformer Engine, version and generation unknown: judges a layout
        meant for a GPU cluster from a laptop (``megaspan plan``); version/generation checks skip."""
        return cls(cuda=True, te=True)

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

    @classmethod
    def cpu(cls) -> Capabilities:
        """A machine without CUDA or Transformer Engine."""
        return cls()

    @classmethod
    def gpu(cls, *, te: bool = True, te_version: str | None = "2.8.0",
            compute_capability: tuple[int, int] = (9, 0), device_name: str | None = "NVIDIA H100") -> Capabilities:
        """A GPU machine (defaults: an H100 with a recent TE): for judging layouts meant for GPUs."""
        return cls(cuda=True, te=te, te_version=te_version if te else None,
                   device_name=device_name, compute_capability=compute_capability)

"""Which layer backend runs here: Transformer Engine detection and ``model.transformer_impl``."""

from __future__ import annotations

from megaspan.config.capabilities import Capabilities
from megaspan.errors import BackendError


def te_available() -> bool:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def _te_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("transformer-engine")
    except Exception:  # noqa: BLE001 - TE wheels are published under a few names
        try:
            import transformer_engine

            return str(getattr(transformer_engine, "__version__", None) or "") or None
        except Exception:  # noqa: BLE001
            return None


def local_device_index() -> int:
    """The CUDA device this rank will use: ``LOCAL_RANK`` modulo the visible devices, as
    ``megaspan.runtime.init_process_group`` later sets it. Queried explicitly, because before
    ``set_device`` runs, torch's "current device" is 0 on every rank (every rank of a node would
    describe, and may create a context on, GPU 0)."""
    import os

    import torch

    count = torch.cuda.device_count()
    return int(os.environ.get("LOCAL_RANK", "0")) % count if count else 0


def detect_capabilities() -> Capabilities:
    """This process's CUDA device and Transformer Engine, for :func:`megaspan.config.validate`."""
    import torch

    cuda = torch.cuda.is_available()
    te = te_available()
    index = local_device_index() if cuda else None
    return Capabilities(
        cuda=cuda,
        te=te,
        te_version=_te_version() if te else None,
        device_name=torch.cuda.get_device_name(index) if cuda else None,
        compute_capability=tuple(torch.cuda.get_device_capability(index)) if cuda else None,
    )


def kernel_available(module: str) -> bool:
    """Whether a compiled CUDA extension Megatron-Core imports lazily is installed (Apex's
    ``fused_weight_gradient_mlp_cuda``, Megatron's ``scaled_upper_triang_masked_softmax_cuda``).
    Found, not imported: importing needs a driver."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


TE_PICKLE_OPT_IN = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
"""Transformer Engine >= 2.17 refuses to unpickle FP8 extra state (delayed scaling's
``scale_fwd`` / ``amax_history_*``) from a checkpoint unless this is ``1``
(TE ``pytorch/_extra_state.py``); without it every resume of an FP8-delayed run fails."""


def allow_fp8_extra_state(cfg) -> bool:
    """Opt in to loading TE's pickled FP8 extra state for an FP8-delayed run, unless the user set
    :data:`TE_PICKLE_OPT_IN` themselves (``0`` keeps TE's refusal). Returns whether it is on.

    The launchers (``launch/env.sh``) and the image set it too; doing it here as well covers
    in-process trainers and plain ``torchrun``. The payloads are the run's own checkpoints
    (CRC-verified before loading); only the delayed recipe stores anything in them.
    """
    import os

    if cfg.precision.fp8 is None or cfg.precision.fp8_recipe != "delayed":
        return os.environ.get(TE_PICKLE_OPT_IN) == "1"
    os.environ.setdefault(TE_PICKLE_OPT_IN, "1")
    return os.environ[TE_PICKLE_OPT_IN] == "1"


def resolve_impl(requested: str) -> str:
    """'auto' -> TE when it imports and CUDA is present, else local."""
    import torch

    if requested == "auto":
        return "transformer_engine" if te_available() and torch.cuda.is_available() else "local"
    if requested == "transformer_engine" and not te_available():
        raise BackendError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not installed: "
            "use the NGC-based image (docker/) or set model.transformer_impl=local"
        )
    return requested

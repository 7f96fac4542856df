"""Run Megatron-Core 0.19.2 on CPU with gloo.

Megatron-Core assumes CUDA in a handful of places:
the "CUDA" RNG tracker, ``torch.cuda.current_device()`` for buffers, side streams in the MoE
alltoall dispatcher, hard-coded ``device="cuda"`` in the pipeline schedules' token counters, ``.type()`` checks
in the optimizer and grad clipping, and numpy split sizes in the alltoall dispatcher.

:func:`apply` patches exactly those sites when no CUDA device is present and does nothing when
one is. Entry points switch it on explicitly (``megaspan.runtime.setup_cpu()``: the ``megaspan``
commands, the test fixtures and harness ranks) before a model is built;
``megaspan.runtime.initialize_model_parallel`` refuses to run on a CPU-only machine without it. Every Megatron-Core private name touched here is listed in :data:`PATCHED_NAMES`;
``tests/unit/test_runtime_contract.py`` fails loudly if one of them disappears in an upgrade.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import types

import torch
from torch.overrides import TorchFunctionMode

# (module, attribute) pairs of Megatron-Core that this file replaces or relies on.
PATCHED_NAMES: tuple[tuple[str, str], ...] = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.tensor_parallel.random", "initialize_rng_tracker"),
    ("megatron.core.tensor_parallel.random", "CheckpointWithoutOutput"),
    ("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu"),
    ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu"),
    ("megatron.core.pipeline_parallel.schedules", "torch"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    (
        "megatron.core.models.common.language_module.language_module.LanguageModule",
        "setup_embeddings_and_output_layer",
    ),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
)

_lock = threading.Lock()
_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` to CPU, and report CPU tensors'
    ``.type()`` by their CUDA names, inside the schedules and the optimizer.

    Only entered around optimizer construction and step, checkpoint save/load (type checks and
    ``device='cuda'`` scalars in the optimizer, grad clipping and dist_checkpointing) and the
    one-off tied-embedding setup; never around forward/backward, where it would add a Python
    call to every torch op (the schedules' own CUDA tensors are handled by
    :func:`_cpu_torch_view`). No process-wide ``Tensor`` method is replaced.
    """

    @staticmethod
    def _fix(dev):
        if isinstance(dev, str) and dev.startswith("cuda"):
            return "cpu"
        if isinstance(dev, torch.device) and dev.type == "cuda":
            return torch.device("cpu")
        return dev

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizer and grad clipping check parameter types by their CUDA names
            # ("torch.cuda.FloatTensor"); they run inside this mode (training.setup.cuda_free).
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = self._fix(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], self._fix(args[1]), *args[2:])
        return func(*args, **kwargs)


def _wrap_schedule(fn):
    def wrapped(*args, **kwargs):
        with CudaToCpuMode():
            return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    wrapped.__name__ = fn.__name__
    return wrapped


def _cpu_torch_view() -> types.ModuleType:
    """A module that is ``torch`` except that ``zeros(..., device="cuda")`` and
    ``autocast("cuda", ...)`` land on the CPU (for a module-level ``torch`` name in Megatron)."""
    view = types.ModuleType("torch")
    view.__dict__.update(torch.__dict__)
    # Names torch creates lazily after this copy are still found (PEP 562 module __getattr__).
    view.__getattr__ = lambda name: getattr(torch, name)

    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=CudaToCpuMode._fix(device), **kwargs)

    def autocast(device_type, *args, **kwargs):
        return torch.autocast(CudaToCpuMode._fix(device_type), *args, **kwargs)

    view.zeros = zeros
    view.autocast = autocast
    return view


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _DummyEvent()


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _DummyStream
    cuda.Event = _DummyEvent
    cuda.current_stream = lambda *a, **k: _DummyStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # The "CUDA" RNG of Megatron's tracker is the CPU default generator on CPU runs.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # Not torch.manual_seed: it calls cuda.manual_seed_all and would recurse through here.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    torch.Tensor.record_stream = lambda self, stream: None


def _patch_megatron() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    base = random.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):
        """Megatron's tracker without the 'CPU RNG state changed' check.

        On CPU the tracked "CUDA" state *is* the CPU generator, so the upstream check fires on
        every dropout call inside a fork although nothing is wrong.
        """

        @contextlib.contextmanager
        def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    random.CudaRNGStatesTracker = CpuRNGStatesTracker
    random.initialize_rng_tracker(force_reset=True)

    # CheckpointWithoutOutput sets fp8 = (fp8 is not None), i.e. True for fp8=False, and then
    # touches TE's FP8GlobalStateManager, which is undefined without TE.
    ckpt_cls = random.CheckpointWithoutOutput
    original_init = ckpt_cls.__init__

    def ckpt_init(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = bool(fp8)

    ckpt_cls.__init__ = ckpt_init

    # The alltoall dispatcher needs numpy split sizes; upstream converts only CUDA tensors.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # The unfused softmax builds its default causal mask with device="cuda".
    utils = importlib.import_module("megatron.core.transformer.utils")
    fused_softmax = importlib.import_module("megatron.core.fusions.fused_softmax")

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask

    # Tied embeddings under PP: the first/last stage all-reduce the word embeddings after .cuda().
    lm = importlib.import_module("megatron.core.models.common.language_module.language_module")
    lm.LanguageModule.setup_embeddings_and_output_layer = _wrap_schedule(
        lm.LanguageModule.setup_embeddings_and_output_layer
    )

    # The schedules hard-code device="cuda" for their token counters (and autocast("cuda") under
    # bf16/fp16). Rather than running the whole forward/backward inside CudaToCpuMode (a Python
    # call per torch op of the model), the schedules module gets its own view of ``torch`` whose
    # ``zeros`` and ``autocast`` map CUDA to CPU; every other name is torch's own object.
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    schedules.torch = _cpu_torch_view()


def apply() -> bool:
    """Patch Megatron-Core for CPU execution; a no-op with CUDA. Returns True if patched.

    Called explicitly by entry points through :func:`megaspan.runtime.setup_cpu`.
    """
    global _applied
    if cuda_available():
        return False
    with _lock:
        if not _applied:
            _patch_torch_cuda()
            _patch_megatron()
            _applied = True
    return True


def is_applied() -> bool:
    return _applied

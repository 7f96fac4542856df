"""Deterministic, resumable, data-parallel micro-batch feeding over a map-style dataset.

Sampling rule. Megatron's ``MegatronPretrainingSampler`` lives in ``megatron.training`` (GPU-only
code), so this is the same rule written small: the global sample order is the dataset's own index
order (``GPTDataset`` already shuffles deterministically from the seed), each step consumes one
global batch of ``micro_batch_size * dp_size * num_microbatches`` consecutive indices, and
data-parallel rank ``r`` takes slice ``r`` of every ``micro_batch_size * dp_size`` block. The
position is a single integer (``consumed_samples``), which is all a checkpoint needs to resume
exactly.

Feeding, as Megatron's ``get_batch_on_this_tp_rank`` does it:

* only tensor-parallel rank 0 reads the dataset; it copies each micro-batch to the device and
  broadcasts it to the other ranks of its TP group (which hold the same micro-batches);
* a pipeline stage reads only what it uses: the first stage the inputs (``tokens``,
  ``position_ids``), the last stage the targets (``labels``, ``loss_mask``), middle stages
  nothing (an ``attention_mask`` goes to every stage that has one). Absent keys are ``None``;
* the reading rank reads and collates ahead on a background thread (``prefetch`` micro-batches,
  into pinned memory on CUDA, so the host-to-device copy is asynchronous);
* with context parallelism (CP > 1), every CP rank of a data-parallel replica receives the same
  whole micro-batch and then keeps only its part of the sequence, as Megatron-LM's ``get_batch``
  does with ``megatron.core.utils.get_batch_on_this_cp_rank``: the sequence is cut into
  ``2 x CP`` chunks and CP rank ``r`` keeps chunks ``r`` and ``2 x CP - 1 - r`` (load-balanced
  causal attention; Megatron's RoPE and TE's ring attention expect exactly this layout).
  Megatron-Core's model never splits the sequence itself.

Read-ahead never moves the position: the trainer derives ``consumed_samples`` from the steps it
took, and a resume or a seek builds a new feeder at that position (the old one's thread stops
when the feeder is dropped or closed). Every rank sees exactly the batches of the plain loop.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

Batch = dict[str, Any]  # key -> tensor, or None for a key this pipeline stage does not use

INPUT_KEYS = ("tokens", "position_ids")
TARGET_KEYS = ("labels", "loss_mask")
ALL_STAGES_KEYS = ("attention_mask",)
PREFETCH = 2
"""Default read-ahead, in micro-batches (0 = read on the main thread)."""


def micro_batch_indices(
    consumed_samples: int, total_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[range]:
    """Index ranges of this rank's micro-batches, starting at ``consumed_samples``.

    Stops before a block that does not fit completely, so every rank yields the same number of
    micro-batches (a ragged tail would hang the data-parallel gradient reduction).
    """
    block = micro_batch_size * dp_size
    start = consumed_samples
    while start + block <= total_samples:
        first = start + dp_rank * micro_batch_size
        yield range(first, first + micro_batch_size)
        start += block


def collate(samples: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors (GPTDataset yields torch tensors or numpy arrays) into a batch."""
    keys = list(samples[0]) if keys is None else [k for k in keys if k in samples[0]]
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in keys}


def stage_keys(first_stage: bool, last_stage: bool, attention_mask: bool = False) -> tuple[str, ...]:
    """The batch keys a pipeline stage uses (the rest are fed as ``None``).

    ``attention_mask``: the dataset builds per-sample masks (document masking), which every
    stage's attention needs; otherwise attention is plainly causal and middle stages read nothing.
    """
    keys: tuple[str, ...] = ALL_STAGES_KEYS if attention_mask else ()
    if first_stage:
        keys += INPUT_KEYS
    if last_stage:
        keys += TARGET_KEYS
    return keys


def has_attention_mask(dataset: Any) -> bool:
    """Whether ``dataset``'s samples carry an ``attention_mask`` (GPTDataset's config says so)."""
    return bool(getattr(getattr(dataset, "config", None), "create_attention_mask", False))


def _cp_group() -> Any:
    """Megatron's context-parallel group when CP > 1, else None (nothing to split)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_context_parallel_world_size() == 1:
        return None
    return ps.get_context_parallel_group()


def split_for_context_parallel(batch: Batch, cp_group: Any) -> Batch:
    """This CP rank's part of every sequence-dimension tensor of ``batch`` (``[b, s]`` tokens,
    labels, loss mask, positions; ``[b, 1, s, s]`` masks on the query dimension), by Megatron-Core's
    own ``get_batch_on_this_cp_rank`` (per-sequence zigzag: chunks r and 2 x CP - 1 - r)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    present = {k: v for k, v in batch.items() if v is not None}
    return {**batch, **get_batch_on_this_cp_rank(present, is_hybrid_cp=False, cp_group=cp_group)}


def _parallel_position(vp_stage: int | None, attention_mask: bool) -> tuple[tuple[str, ...] | None, Any, int]:
    """(keys this chunk needs, TP group or None, TP source rank) from Megatron's parallel state.

    ``keys`` is None (= every key) when the state is not initialized, or when a rank holds
    several virtual stages and the caller did not say which one this iterator feeds.
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, None, 0
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp and vpp > 1 and vp_stage is None:
        keys = None
    else:
        stage = vp_stage if vpp and vpp > 1 else None
        keys = stage_keys(
            ps.is_pipeline_first_stage(ignore_virtual=stage is None, vp_stage=stage),
            ps.is_pipeline_last_stage(ignore_virtual=stage is None, vp_stage=stage),
            attention_mask,
        )
    if ps.get_tensor_model_parallel_world_size() == 1:
        return keys, None, 0
    return keys, ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()


_DONE = object()
_ABSENT: dict[str, None] = dict.fromkeys(INPUT_KEYS + TARGET_KEYS)
"""The keys the forward step indexes, fed as None where this stage does not use them."""


def _produce(
    dataset, indices: Iterator[range], keys, pin: bool, out: queue.Queue, stop: threading.Event
) -> None:
    """Background reader: collate micro-batches in order into ``out`` until exhausted or stopped."""
    try:
        for idx in indices:
            batch = collate([dataset[i] for i in idx], keys)
            if pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        item: object = _DONE
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        item = exc
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class MicroBatches:
    """Iterator of this rank's micro-batches from ``consumed_samples`` on (see the module doc),
    as tensors on ``device``.

    ``vp_stage``: the virtual pipeline stage this iterator feeds (with VPP, so that each chunk
    reads only its keys; without it such a rank reads every key). ``prefetch``: read-ahead in
    micro-batches; None = the module's :data:`PREFETCH`. ``keys`` / ``tp_group`` /
    ``tp_src_rank`` / ``cp_group`` override what Megatron's parallel state says (tests).
    """

    def __init__(
        self,
        dataset: Any,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        device: torch.device,
        *,
        vp_stage: int | None = None,
        prefetch: int | None = None,
        keys: Sequence[str] | None = None,
        tp_group: Any = None,
        tp_src_rank: int = 0,
        cp_group: Any = None,
    ):
        auto_keys, auto_group, auto_src = _parallel_position(vp_stage, has_attention_mask(dataset))
        self.cp_group = cp_group if cp_group is not None else _cp_group()
        self.keys = tuple(keys) if keys is not None else auto_keys
        self.tp_group = tp_group if tp_group is not None else auto_group
        self.tp_src = tp_src_rank if tp_group is not None else auto_src
        self.device = device
        self.reads = self.tp_group is None or torch.distributed.get_rank() == self.tp_src
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._thread: threading.Thread | None = None
        self._indices: Iterator[range] | None = None
        self._dataset = dataset
        self._exhausted = False
        indices = micro_batch_indices(consumed_samples, len(dataset), micro_batch_size, dp_rank, dp_size)
        if not self.reads or self.keys == ():
            # Nothing to read on this rank (it receives by broadcast, or uses no tokens); it still
            # walks the indices so that it ends exactly where the reading rank does.
            self._indices = indices
            return
        prefetch = PREFETCH if prefetch is None else prefetch
        if prefetch <= 0:
            self._indices = indices
            return
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        pin = device.type == "cuda"
        self._thread = threading.Thread(
            target=_produce,
            args=(dataset, indices, self.keys, pin, self._queue, self._stop),
            name="megaspan-prefetch",
            daemon=True,
        )
        # Stop the reader when this iterator is dropped (a seek or resume replaces it).
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._finalizer()
            self._thread.join(timeout=5)

    def __iter__(self) -> MicroBatches:
        return self

    def _read(self) -> dict[str, torch.Tensor]:
        if self._thread is not None:
            item = self._queue.get()
            if item is _DONE:
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            return item
        assert self._indices is not None
        idx = next(self._indices)  # StopIteration ends the iterator
        return collate([self._dataset[i] for i in idx], self.keys)

    def __next__(self) -> Batch:
        if self._exhausted:
            raise StopIteration
        try:
            if self.keys == () or not self.reads:
                next(self._indices)  # type: ignore[arg-type]
                cpu = {}
            else:
                cpu = self._read()
        except StopIteration:
            self._exhausted = True
            raise
        if self.keys == ():
            return dict(_ABSENT)  # a middle pipeline stage: no tokens at all
        batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu.items()}
        if self.tp_group is not None:
            batch = self._broadcast(batch)
        if self.cp_group is not None:
            # After the TP broadcast, as Megatron-LM: the broadcast carries the whole sequence once.
            batch = split_for_context_parallel(batch, self.cp_group)
        return {**_ABSENT, **batch}

    def _broadcast(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """TP rank 0's micro-batch to the rest of its TP group (shapes sent once, first)."""
        import torch.distributed as dist

        if self._meta is None:
            meta = [{k: (tuple(v.shape), v.dtype) for k, v in batch.items()} if self.reads else None]
            dist.broadcast_object_list(meta, src=self.tp_src, group=self.tp_group)
            self._meta = meta[0]
        if not self.reads:
            batch = {
                k: torch.empty(shape, dtype=dtype, device=self.device)
                for k, (shape, dtype) in self._meta.items()
            }
        # Same key order on every rank: the dict order of the source's first batch.
        for key in self._meta:
            dist.broadcast(batch[key], src=self.tp_src, group=self.tp_group)
        return batch


# The functional spelling used by the trainer and tests.
micro_batches = MicroBatches

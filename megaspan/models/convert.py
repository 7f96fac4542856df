"""GPT <-> hybrid weight names and checkpoint keys (``model.arch=gpt`` vs ``model.arch=hybrid``).

GPT block ``i`` (0-based) is hybrid layers ``2i`` (attention half) and ``2i + 1`` (MLP half);
within a layer every module keeps its name (both builds use one spec per block, see
:mod:`megaspan.models.hybrid`), so a name moves by its layer index and by which half owns its
first component (:data:`megaspan.norms.slots.SLOTS`' ``sublayer`` column). The final norm is
``decoder.final_layernorm`` in GPT and ``decoder.final_norm`` in the hybrid stack.

Two uses:

* :func:`gpt_to_hybrid_state_dict` / :func:`hybrid_to_gpt_state_dict` rename a plain
  ``state_dict`` of one model chunk (local layer indices; the chunk boundaries of the two
  architectures coincide);
* :func:`retarget_to_gpt_checkpoint` points a hybrid model chunk's *sharded* state dict at a
  megaspan GPT checkpoint, so ``dist_checkpointing.load`` reads a GPT checkpoint straight into a
  hybrid run (any TP/PP/EP layout). For the homogeneous GPT format (the layer is a sharding
  axis) this is Megatron's own ``gpt_checkpoint_interop``; placements with per-layer keys
  (``hetereogenous_dist_checkpoint``: SpanNorm, Mix-LN, HybridNorm*) need only the layer index
  renumbered. :func:`retarget_to_hybrid_checkpoint` is the reverse (a GPT run reading a hybrid
  checkpoint).
"""

from __future__ import annotations

import re

from megaspan.norms.slots import SLOTS

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_ATTENTION_PARTS = frozenset(
    {"self_attention", "self_attn_bda"} | {s.module for s in SLOTS if s.sublayer == "attention"}
)
_MLP_PARTS = frozenset({"mlp", "mlp_bda"} | {s.module for s in SLOTS if s.sublayer == "mlp"})
GPT_FINAL_NORM = "decoder.final_layernorm."
HYBRID_FINAL_NORM = "decoder.final_norm."


def half_of(rest: str) -> int:
    """0 for a name (after ``decoder.layers.N.``) in a block's attention half, 1 for the MLP half."""
    head = rest.split(".", 1)[0]
    if head in _ATTENTION_PARTS:
        return 0
    if head in _MLP_PARTS:
        return 1
    raise KeyError(f"'{rest}' belongs to neither half of a block")


def gpt_to_hybrid_name(name: str) -> str:
    if m := _LAYER.search(name):
        rest = name[m.end() :]
        return f"{name[: m.start()]}decoder.layers.{2 * int(m[1]) + half_of(rest)}.{rest}"
    return name.replace(GPT_FINAL_NORM, HYBRID_FINAL_NORM)


def hybrid_to_gpt_name(name: str) -> str:
    if m := _LAYER.search(name):
        rest = name[m.end() :]
        index = int(m[1])
        if index % 2 != half_of(rest):
            raise KeyError(f"'{name}': hybrid layer {index} does not hold that half of a block")
        return f"{name[: m.start()]}decoder.layers.{index // 2}.{rest}"
    return name.replace(HYBRID_FINAL_NORM, GPT_FINAL_NORM)


def gpt_to_hybrid_state_dict(state: dict) -> dict:
    return {gpt_to_hybrid_name(k): v for k, v in state.items()}


def hybrid_to_gpt_state_dict(state: dict) -> dict:
    return {hybrid_to_gpt_name(k): v for k, v in state.items()}


# ---- sharded state dicts ------------------------------------------------------------------------


def _map_sharded(sharded_state_dict, fn) -> None:
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    dict_list_map_inplace(lambda e: fn(e) if isinstance(e, ShardedBase) else e, sharded_state_dict)


def retarget_to_gpt_checkpoint(sharded_state_dict, pattern: str, per_layer_keys: bool) -> None:
    """In place: a hybrid chunk's sharded state dict -> the keys of a megaspan GPT checkpoint.

    ``per_layer_keys``: the GPT checkpoint was saved with ``hetereogenous_dist_checkpoint`` (its
    placement's layers own different norms); otherwise it is Megatron's homogeneous format.
    Optimizer sharded state dicts (keys ``optimizer.state.<s>.decoder.layers.<i>...``) map alike.
    """
    from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
        gpt_compatible_layer_maps,
        retarget_sharded_state_dict_to_gpt_checkpoint,
    )

    if not per_layer_keys:
        retarget_sharded_state_dict_to_gpt_checkpoint(sharded_state_dict, gpt_compatible_layer_maps(pattern))
        return

    def rename(entry):
        if entry.key.endswith("output_layer._extra_state"):
            from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

            return LocalNonpersistentObject(entry.data)  # GPT checkpoints omit it
        entry.key = hybrid_to_gpt_name(entry.key)
        return entry

    _map_sharded(sharded_state_dict, rename)


def retarget_to_hybrid_checkpoint(sharded_state_dict, per_layer_keys: bool) -> None:
    """In place: a GPT chunk's sharded state dict -> the keys of a megaspan hybrid checkpoint.

    Hybrid checkpoints always have per-layer keys; a homogeneous GPT entry (the layer index is
    its first sharding axis) loses that axis and gains the index in its key.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    homogeneous = re.compile(r"decoder\.layers\.(?!\d)")

    def drop_layer_axis(entry):
        layer = entry.global_offset[0]
        if isinstance(entry, ShardedTensor):
            entry.global_shape = entry.global_shape[1:]
            entry.global_offset = entry.global_offset[1:]
            entry.axis_fragmentations = entry.axis_fragmentations[1:]
            entry.prepend_axis_num -= 1
        elif isinstance(entry, ShardedObject):
            rest_shape, rest_offset = entry.global_shape[1:], entry.global_offset[1:]
            entry.global_shape, entry.global_offset = (
                (rest_shape, rest_offset) if rest_shape else ((1,), (0,))
            )
        return layer

    def rename(entry):
        if not per_layer_keys and (m := homogeneous.search(entry.key)):
            if isinstance(entry, ShardedTensorFactory):
                inner = entry.build_fn

                def build(key, data, replica_id, flattened_range, _inner=inner):
                    built = _inner(key, data, replica_id, flattened_range)
                    _map_sharded(built, rename)
                    return built

                entry.build_fn = build
                return entry
            layer = drop_layer_axis(entry)
            rest = entry.key[m.end() :]
            entry.key = f"{entry.key[: m.start()]}decoder.layers.{2 * layer + half_of(rest)}.{rest}"
            return entry
        entry.key = gpt_to_hybrid_name(entry.key)
        return entry

    _map_sharded(sharded_state_dict, rename)

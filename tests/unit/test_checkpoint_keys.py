"""Placements whose layers own different norms still round-trip through dist_checkpointing."""

from __future__ import annotations

import pytest
import torch

from megaspan.models import build_model
from megaspan.norms import available
from megaspan.training.setup import cuda_free
from tests.helpers.models import stack_cfg as make_cfg


@pytest.mark.parametrize("placement", ["spannorm", "mixln", "hybridnorm_star", "pre", "lns"])
def test_dist_checkpoint_round_trip(mcore, tmp_path, placement):
    from megatron.core import dist_checkpointing

    saved = build_model(make_cfg(placement), vocab_size=64).chunks[0]
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p))  # differ from any fresh init
    fresh = build_model(make_cfg(placement), vocab_size=64).chunks[0]
    with cuda_free():
        dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    for (name, a), (_, b) in zip(saved.state_dict().items(), fresh.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("placement", list(available()))
def test_stacked_layers_share_checkpoint_keys(mcore, placement):
    """Unless the placement asks for per-layer keys (``layer_dependent_slots``), Megatron stacks
    every layer's tensors on one layer axis, so all layers must map to the same key names - the
    TE fused-norm names included (LNS's block 1, scale 1/sqrt(1) = 1, once got them alone)."""
    built = build_model(make_cfg(placement), vocab_size=64)
    layers = built.chunks[0].decoder.layers
    if built.placement.layer_dependent_slots:
        pytest.skip("per-layer checkpoint keys (hetereogenous_dist_checkpoint)")
    # The stored key is the ShardedTensor's .key (the keys map renames it; the dict key stays).
    keys = [
        sorted(
            v.key for k, v in layer.sharded_state_dict(prefix="").items() if not k.endswith("_extra_state")
        )
        for layer in layers
    ]
    assert all(k == keys[0] for k in keys), keys

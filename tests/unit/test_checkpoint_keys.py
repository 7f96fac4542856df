"""Placements whose layers own different norms still round-trip through dist_checkpointing."""

from __future__ import annotations

import pytest
import torch

from megaspan.models import build_model
from megaspan.training.setup import cuda_free
from tests.unit.test_placements import make_cfg


@pytest.mark.parametrize("placement", ["spannorm", "mixln", "hybridnorm_star", "pre"])
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

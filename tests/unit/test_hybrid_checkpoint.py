"""GPT checkpoint -> hybrid model, and back, for every placement (per-layer keys included).

A megaspan GPT checkpoint (``dist_checkpointing``, homogeneous layer axis or per-layer keys for
placements whose layers own different norms) loads into a hybrid model through
:func:`megaspan.models.convert.retarget_to_gpt_checkpoint`; the hybrid model then saves its own
(per-layer) checkpoint, which loads into a fresh GPT model through
:func:`~megaspan.models.convert.retarget_to_hybrid_checkpoint` and gives back the original weights.
"""

from __future__ import annotations

import pytest
import torch

from megaspan.models import build_model
from megaspan.models.convert import (
    gpt_to_hybrid_state_dict,
    retarget_to_gpt_checkpoint,
    retarget_to_hybrid_checkpoint,
)
from megaspan.models.hybrid import build_hybrid_model
from megaspan.norms import available
from tests.helpers.models import fresh_model_parallel, tiny_cfg

VOCAB = 128
_META = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def _build(cfg, hybrid: bool, seed: int):
    fresh_model_parallel(seed=seed)
    return (build_hybrid_model if hybrid else build_model)(cfg, VOCAB)


def _tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _save(model, path):
    from megatron.core import dist_checkpointing

    path.mkdir()
    dist_checkpointing.save({"model0": model.sharded_state_dict(metadata=dict(_META))}, str(path))


def _load(model, path, retarget):
    from megatron.core import dist_checkpointing

    template = model.sharded_state_dict(metadata=dict(_META))
    retarget(template)
    model.load_state_dict(dist_checkpointing.load({"model0": template}, str(path))["model0"])


PLACEMENTS = list(available())


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gpt_checkpoint_round_trips_through_hybrid(mcore, tmp_path, placement, moe):
    cfg = tiny_cfg(placement, moe)
    gpt_built = _build(cfg, False, seed=1)
    gpt = gpt_built.chunks[0]
    per_layer = gpt_built.placement.layer_dependent_slots
    assert gpt.config.hetereogenous_dist_checkpoint == per_layer
    _save(gpt, tmp_path / "gpt")
    original = _tensors(gpt_to_hybrid_state_dict(gpt.state_dict()))

    hybrid_built = _build(cfg, True, seed=2)  # other weights, so the load must replace all of them
    hybrid = hybrid_built.chunks[0]
    assert any(not torch.equal(v, original[k]) for k, v in _tensors(hybrid.state_dict()).items())
    pattern = hybrid.hybrid_layer_pattern
    _load(hybrid, tmp_path / "gpt", lambda sd: retarget_to_gpt_checkpoint(sd, pattern, per_layer))
    loaded = _tensors(hybrid.state_dict())
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)

    _save(hybrid, tmp_path / "hybrid")
    fresh = _build(cfg, False, seed=3).chunks[0]
    _load(fresh, tmp_path / "hybrid", lambda sd: retarget_to_hybrid_checkpoint(sd, per_layer))
    back = _tensors(gpt_to_hybrid_state_dict(fresh.state_dict()))
    assert all(torch.equal(back[k], original[k]) for k in original)

"""A local-backend checkpoint loads into a model whose norms carry TE-style extra state, and back.

TE's norm modules are torch modules with ``get_extra_state``/``set_extra_state`` (TE's
``BasicOperation``); Megatron wraps their ``<module>._extra_state`` entry as a ``ShardedObject``
(``make_sharded_tensors_for_checkpoint``). The local backend's norms (``SPNorm``) have none, so a
local checkpoint lacks those keys. TE itself needs CUDA, so the model here is a real local
Megatron model whose norms get the same torch extra-state hooks: Megatron then builds the
``_extra_state`` sharded objects itself, exactly as for a TE norm. (The TE model proper is
tests/gpu/test_te_backend.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from megaspan.errors import CheckpointError
from megaspan.norms.modules import SPNorm
from megaspan.training.checkpoint import (
    Progress,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from megaspan.training.setup import cuda_free
from tests.helpers.models import one_optimizer_step, tiny_overrides

VOCAB = 128
# What a TE op's get_extra_state returns when it holds no FP8 metadata: an empty byte tensor.
_DEFAULT_EXTRA = torch.empty(0, dtype=torch.uint8)


def _objs():
    from megaspan.config.loader import load_config
    from megaspan.training.setup import build_training_objects

    return build_training_objects(load_config(None, tiny_overrides("spannorm")), VOCAB)


def _give_norms_extra_state(chunk) -> list[str]:
    """Give every SPNorm of ``chunk`` torch's extra-state hooks, as a TE norm op has; returns
    the ``_extra_state`` keys this adds to ``chunk.state_dict()``. ``set_extra_state`` records
    what it is given, so a test can see whether the checkpoint overwrote the default."""

    class WithExtraState(SPNorm):
        def get_extra_state(self):
            return getattr(self, "_extra", _DEFAULT_EXTRA)

        def set_extra_state(self, state):
            self._extra = state
            self.extra_loaded = True

    names = []
    for name, module in chunk.named_modules():
        if type(module) is SPNorm:
            module.__class__ = WithExtraState
            names.append(f"{name}._extra_state")
    assert names, "the tiny spannorm model has separate norms"
    return names


def _first_norm(chunk) -> tuple[str, nn.Module]:
    return next((n, m) for n, m in chunk.named_modules() if isinstance(m, SPNorm))


def _perturb(chunks) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.add_(torch.randn_like(p))  # differ from any fresh init


def _save(objs, ckpt_dir: Path) -> Path:
    one_optimizer_step(objs)
    with cuda_free():
        return save_checkpoint(
            ckpt_dir, Progress(3, 12), objs.chunks, objs.optimizer, objs.scheduler, {}, None
        )


def _weights(chunk) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in chunk.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k
    }


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("load_optimizer", [True, False])
def test_local_checkpoint_loads_into_model_with_extra_state(mcore, tmp_path, load_optimizer):
    saved = _objs()
    _perturb(saved.chunks)
    path = _save(saved, tmp_path)
    target = _objs()
    added = _give_norms_extra_state(target.chunks[0])
    template = target.chunks[0].sharded_state_dict()
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # Megatron itself made real ShardedObjects of them (what the TE model's template holds).
    for key in added:
        assert isinstance(template[key], ShardedObject), key
    with cuda_free():
        resumed = load_checkpoint(
            path, target.chunks, target.optimizer, target.scheduler, load_optimizer=load_optimizer
        )
    assert resumed.step == (3 if load_optimizer else 0)
    _assert_same_weights(saved.chunks[0], target.chunks[0])
    # The checkpoint has no extra state for them: each norm keeps its own default.
    norms = [m for m in target.chunks[0].modules() if isinstance(m, SPNorm)]
    assert not any(getattr(m, "extra_loaded", False) for m in norms)


def test_checkpoint_with_extra_state_loads_into_local_model(mcore, tmp_path):
    saved = _objs()
    _give_norms_extra_state(saved.chunks[0])
    _perturb(saved.chunks)
    path = _save(saved, tmp_path)
    target = _objs()
    with cuda_free():
        load_checkpoint(path, target.chunks, target.optimizer, target.scheduler)
    _assert_same_weights(saved.chunks[0], target.chunks[0])


def test_a_genuinely_missing_weight_is_still_refused(mcore, tmp_path):
    saved = _objs()
    path = _save(saved, tmp_path)
    target = _objs()
    _give_norms_extra_state(target.chunks[0])
    # A real parameter the checkpoint does not have (as a model with norm biases would).
    _, norm = _first_norm(target.chunks[0])
    norm.register_parameter("extra_gain", nn.Parameter(torch.zeros(norm.weight.shape)))
    with pytest.raises(CheckpointError) as info, cuda_free():
        load_model_weights(path, target.chunks)
    text = str(info.value)
    assert "\n" not in text, text
    assert "extra_gain" in text  # (under its checkpoint key: the spec may rename the module)
    assert "_extra_state" not in text  # only the real mismatch is named


def test_a_checkpoint_with_more_weights_is_refused(mcore, tmp_path):
    """The other direction: a checkpoint tensor no module asks for is not silently dropped."""
    saved = _objs()
    _, norm = _first_norm(saved.chunks[0])
    norm.register_parameter("extra_gain", nn.Parameter(torch.ones(norm.weight.shape)))
    from megatron.core import dist_checkpointing

    with cuda_free():
        dist_checkpointing.save(saved.chunks[0].sharded_state_dict(), str(tmp_path))
    target = _objs()
    with pytest.raises(CheckpointError) as info, cuda_free():
        load_model_weights(tmp_path, target.chunks)
    assert "extra_gain" in str(info.value)

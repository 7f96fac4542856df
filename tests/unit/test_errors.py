"""Bad input gets one clear line naming what is wrong and how to fix it."""

from __future__ import annotations

import pytest

from megaspan.config import ConfigError, load_config, validate
from megaspan.errors import BackendError
from megaspan.models import resolve_impl, te_available


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_placement():
    with pytest.raises(ConfigError) as exc:
        validate(load_config(None, ["model.norm_placement=layernorm_everywhere"]))
    msg = one_line(exc)
    assert "layernorm_everywhere" in msg and "model.norm_placement" in msg and "spannorm" in msg


@pytest.mark.skipif(te_available(), reason="Transformer Engine is installed")
def test_te_backend_without_te():
    with pytest.raises(BackendError) as exc:
        resolve_impl("transformer_engine")
    msg = one_line(exc)
    assert "Transformer Engine" in msg and "model.transformer_impl=local" in msg


def test_heads_not_divisible_by_tp():
    cfg = load_config(None, ["model.num_attention_heads=6", "model.hidden_size=96",
                             "parallel.tensor_model_parallel_size=4"])
    with pytest.raises(ConfigError) as exc:
        validate(cfg, world_size=4)
    msg = one_line(exc)
    assert "num_attention_heads=6" in msg and "tensor_model_parallel_size=4" in msg


@pytest.mark.skipif(te_available(), reason="Transformer Engine is installed")
def test_fp8_without_te():
    with pytest.raises(ConfigError) as exc:
        validate(load_config(None, ["precision.fp8=hybrid"]))
    assert "Transformer Engine" in one_line(exc)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.nmu_layers=4"], "unknown config key 'model.nmu_layers'"),
        (["model.num_layers=four"], "model.num_layers: expected an integer"),
        (["model.moe.num_experts=6", "parallel.expert_model_parallel_size=4"], "not divisible by parallel.expert_model_parallel_size"),
        (["model.moe.num_experts=4", "parallel.tensor_model_parallel_size=2"], "sequence_parallel=true"),
        (["parallel.context_parallel_size=2"], "context_parallel_size"),
        (["parallel.pipeline_model_parallel_size=3"], "pipeline stages"),
        (["model.seq_length=512", "model.max_position_embeddings=256"], "max_position_embeddings"),
    ],
)
def test_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        validate(load_config(None, overrides), world_size=12, cuda=False)
    assert needle in one_line(exc)


def test_global_batch_vs_dp():
    cfg = load_config(None, ["training.global_batch_size=6", "training.micro_batch_size=4"])
    with pytest.raises(ConfigError) as exc:
        validate(cfg, world_size=2)
    assert "global_batch_size=6" in one_line(exc)


def test_exponent_floats_without_dot_are_numbers():
    cfg = load_config(None, ["optimizer.lr=1e-3", "model.layernorm_epsilon=1e-12"])
    assert cfg.optimizer.lr == 1e-3 and cfg.model.layernorm_epsilon == 1e-12
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["optimizer.lr=fast"])
    assert "optimizer.lr: expected a number" in one_line(exc)

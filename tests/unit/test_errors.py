"""Bad input gets one clear line naming what is wrong and how to fix it."""

from __future__ import annotations

import pytest

from megaspan.config import Capabilities, ConfigError, load_config, validate
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
    cfg = load_config(
        None, ["model.num_attention_heads=6", "model.hidden_size=96", "parallel.tensor_model_parallel_size=4"]
    )
    with pytest.raises(ConfigError) as exc:
        validate(cfg, world_size=4)
    msg = one_line(exc)
    assert "num_attention_heads=6" in msg and "tensor_model_parallel_size=4" in msg


def test_fp8_without_te():
    with pytest.raises(BackendError) as exc:
        validate(load_config(None, ["precision.fp8=hybrid"]), 1, Capabilities.cpu())
    assert "Transformer Engine" in one_line(exc)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.nmu_layers=4"], "unknown config key 'model.nmu_layers'"),
        (["model.num_layers=four"], "model.num_layers: expected an integer"),
        (
            ["model.moe.num_experts=6", "parallel.expert_model_parallel_size=4"],
            "not divisible by parallel.expert_model_parallel_size",
        ),
        (["model.moe.num_experts=4", "parallel.tensor_model_parallel_size=2"], "sequence_parallel=true"),
        (["parallel.context_parallel_size=2"], "context_parallel_size"),
        (["parallel.pipeline_model_parallel_size=3"], "pipeline stages"),
        (["model.seq_length=512", "model.max_position_embeddings=256"], "max_position_embeddings"),
        (["training.z_loss=-1e-4"], "training.z_loss must be"),
        (["training.z_loss=nan"], "training.z_loss must be"),
        (["training.z_loss=inf"], "training.z_loss must be"),
    ],
)
def test_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        validate(load_config(None, overrides), 12, Capabilities.cpu())
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


@pytest.mark.parametrize(
    "overrides,needle",
    [
        # A typo: the valid options of the selected placement are listed.
        (
            ["model.norm.span_include_atn_term=true"],
            "model.norm.span_include_atn_term is not an option of model.norm_placement=spannorm (its options: "
            "final_norm, span_branch_init, span_include_attn_term, span_include_y_term, span_residual_alpha)",
        ),
        # An option of another placement: named as such.
        (["model.norm.mixln_alpha=0.5"], "it is an option of mixln"),
        (["model.norm_placement=pre", "model.norm.span_include_y_term=true"], "its options: final_norm)"),
        (["model.norm.span_residual_alpha=big"], "model.norm.span_residual_alpha: expected a number"),
        (["model.norm.mixln_alpha.x=1"], "unknown config key 'model.norm.mixln_alpha.x'"),
    ],
)
def test_placement_options_are_checked_against_the_placement(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert needle in one_line(exc)


def test_placement_options_resolve_in_any_order(tmp_path):
    """The placement may be chosen after its options (recipe, then overrides); dumps round-trip."""
    from megaspan.config import dump_config

    cfg = load_config(None, ["model.norm.mixln_alpha=0.75", "model.norm_placement=mixln"])
    assert cfg.model.norm.mixln_alpha == 0.75 and cfg.model.norm.final_norm is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  norm_placement: spannorm\n  norm:\n    span_include_attn_term: true\n")
    cfg = load_config(str(recipe), ["model.norm.span_residual_alpha=0.5"])
    assert cfg.model.norm.span_include_attn_term and cfg.model.norm.span_residual_alpha == 0.5
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_config_imports_no_torch():
    """`import megaspan.config` loads neither torch nor another megaspan package; loading and
    validating a config adds only the torch-free placement registry (megaspan.norms)."""
    import subprocess
    import sys

    code = (
        "import sys; import megaspan.config as c; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'numpy'}), "
        "sorted(m for m in sys.modules if m.startswith('megaspan.') and not m.startswith(('megaspan.config', "
        "'megaspan.errors')))); "
        "c.validate(c.load_config('default', ['model.norm.span_include_y_term=true']), 1, c.Capabilities.cpu()); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'numpy'}), "
        "sorted(m for m in sys.modules if m.startswith(('megaspan.models', 'megaspan.norms.layer', "
        "'megaspan.norms.modules', 'megaspan.training'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[] []", "[] []"]


def test_detect_capabilities_matches_this_machine():
    import torch

    from megaspan.models import detect_capabilities

    caps = detect_capabilities()
    assert caps.cuda == torch.cuda.is_available() and caps.te == te_available()
    assert (caps.compute_capability is None) == (not caps.cuda)

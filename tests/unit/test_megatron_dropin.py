"""``--spec megaspan.megatron <placement>`` in stock Megatron-LM r0.19.

Megatron-LM's ``megatron/training`` is not in the Megatron-Core wheel, so the builder's calls are
reproduced here line for line from r0.19 (``megatron/training/models/gpt.py``
``GPTModelBuilder.build_model`` and ``hybrid.py`` ``HybridModelBuilder.build_model``;
``gpt_config_from_args``: ``transformer_layer_spec = import_module(args.spec)``):

* the spec is resolved with Megatron-Core's ``import_module((module, name))``;
* a callable spec whose signature has ``vp_stage`` is called ``spec(model_config, vp_stage=...)``
  with the ``GPTModelConfig`` (a proxy whose unknown attributes read and write the
  ``TransformerConfig``; it owns ``pre_wrap_hooks``);
* the pre-wrap hooks run on the list of built chunks.

The ``TransformerConfig`` is what Megatron-LM's arguments give: megaspan's mapping of the same
model with plain Pre-LN settings (no placement-specific field). The built model must equal
megaspan's own build of the placement: same weights from the same seed, same loss.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from megaspan.models import build_model
from megaspan.models.build import placement_for
from megaspan.models.hybrid import build_hybrid_model, hybrid_transformer_config
from megaspan.models.mcore_config import transformer_config
from megaspan.norms import available
from tests.helpers.models import fresh_model_parallel, tiny_cfg

VOCAB = 128
STD = ("model.init_method_std=0.02",)  # Megatron-LM passes --init-method-std explicitly


@dataclasses.dataclass
class GPTModelConfig:
    """The parts of r0.19's ``megatron.training.models.gpt.GPTModelConfig`` a spec sees."""

    transformer: object
    pre_wrap_hooks: list = dataclasses.field(default_factory=list)

    def __getattr__(self, name):
        transformer = object.__getattribute__(self, "transformer")
        if hasattr(transformer, name):
            return getattr(transformer, name)
        raise AttributeError(name)


def _megatron_lm_transformer_config(cfg):
    """What Megatron-LM's arguments produce for this model: no placement-specific settings."""
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm_placement="pre", norm={}))
    config = transformer_config(plain, placement_for(plain), cuda=False)
    config.transformer_impl = "local"  # --transformer-impl local (CPU)
    return config


def _gpt_builder(model_config, spec_name: str, vp_stage=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    spec = import_module(("megaspan.megatron", spec_name))
    if not isinstance(spec, ModuleSpec) and callable(spec):
        if "vp_stage" in inspect.signature(spec).parameters:
            spec = spec(model_config, vp_stage=vp_stage)
        else:
            spec = spec(model_config)
    model = GPTModel(
        config=model_config.transformer,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=16,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        pre_process=True,
        post_process=True,
        vp_stage=vp_stage,
    )
    model_list = [model]
    for hook in model_config.pre_wrap_hooks:  # compose_hooks
        model_list = hook(model_list)
    return model_list[0]


def _loss(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    labels = torch.randint(0, VOCAB, (2, 16), generator=g)
    return model(tokens, torch.arange(16).expand_as(tokens), None, labels=labels)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items() if torch.is_tensor(v))


@pytest.mark.parametrize("placement", list(available()))
def test_pretrain_gpt_spec_equals_megaspan(mcore, placement):
    cfg = tiny_cfg(placement, extra=STD)
    fresh_model_parallel(seed=1234)
    ours = build_model(cfg, VOCAB).chunks[0]
    fresh_model_parallel(seed=1234)
    model_config = GPTModelConfig(_megatron_lm_transformer_config(cfg))
    theirs = _gpt_builder(model_config, placement)
    assert len(model_config.pre_wrap_hooks) == 1
    assert _same(ours, theirs)
    assert torch.equal(_loss(ours), _loss(theirs))
    built = placement_for(cfg)
    assert model_config.transformer.qk_layernorm == built.qkv_norm
    assert model_config.transformer.hetereogenous_dist_checkpoint == built.layer_dependent_slots


@pytest.mark.parametrize("placement", ["pre", "spannorm", "hybridnorm"])
def test_pretrain_gpt_keeps_qk_layernorm(mcore, placement):
    """Megatron-LM's --qk-layernorm composes with every placement as megaspan's
    model.qk_layernorm does (HybridNorm: the same Q/K norms, not a second pair)."""
    cfg = tiny_cfg(placement, extra=(*STD, "model.qk_layernorm=true"))
    fresh_model_parallel(seed=1234)
    ours = build_model(cfg, VOCAB).chunks[0]
    fresh_model_parallel(seed=1234)
    model_config = GPTModelConfig(_megatron_lm_transformer_config(cfg))
    assert model_config.transformer.qk_layernorm  # what --qk-layernorm gives
    theirs = _gpt_builder(model_config, placement)
    assert _same(ours, theirs) and any("q_layernorm" in k for k in ours.state_dict())
    assert torch.equal(_loss(ours), _loss(theirs))


@pytest.mark.parametrize("placement", ["spannorm", "mixln", "deepnorm", "hybridnorm_star"])
def test_pretrain_hybrid_spec_equals_megaspan(mcore, placement):
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.spec_utils import import_module

    cfg = tiny_cfg(placement, moe=True, extra=(*STD, "model.moe.layer_freq=2"))
    fresh_model_parallel(seed=1234)
    ours = build_hybrid_model(cfg, VOCAB).chunks[0]
    fresh_model_parallel(seed=1234)
    plain = _megatron_lm_transformer_config(cfg)
    theirs = HybridModel(
        config=hybrid_transformer_config(plain, placement_for(tiny_cfg("pre"))),
        hybrid_stack_spec=import_module(("megaspan.megatron", f"hybrid_{placement}")),
        vocab_size=VOCAB,
        max_sequence_length=16,
        hybrid_layer_pattern="*E*-*E*-",
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    assert _same(ours, theirs)
    assert torch.equal(_loss(ours), _loss(theirs))


def test_options_from_yaml_file(tmp_path, monkeypatch):
    from megaspan.errors import ConfigError
    from megaspan.megatron import OPTIONS_ENV, placement_options

    path = tmp_path / "norm.yaml"
    path.write_text("span_include_y_term: true\nspan_residual_alpha: 0.5\n")
    monkeypatch.setenv(OPTIONS_ENV, str(path))
    options = placement_options("spannorm")
    assert options.span_include_y_term is True and options.span_residual_alpha == 0.5
    with pytest.raises(ConfigError, match="not an option of model.norm_placement=mixln"):
        placement_options("mixln")

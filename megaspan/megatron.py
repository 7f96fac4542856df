"""megaspan placements as ``--spec`` targets for stock Megatron-LM (r0.19) training scripts.

GPT (``pretrain_gpt.py``): every placement name is a function of this module::

    python pretrain_gpt.py ... --spec megaspan.megatron spannorm

Megatron-LM r0.19's ``GPTModelBuilder.build_model`` imports ``megaspan.megatron.spannorm`` and,
because it is a callable with a ``vp_stage`` parameter, calls it as ``spannorm(config,
vp_stage=vp_stage)`` with its ``GPTModelConfig`` (a proxy over the ``TransformerConfig``). The
function

* returns megaspan's block spec for this (virtual) pipeline stage (one spec per global layer,
  the placement's final norm or none) - the same spec ``megaspan train`` builds;
* sets what the placement needs on the config: ``qk_layernorm`` (HybridNorm), per-layer
  checkpoint keys (``hetereogenous_dist_checkpoint``) when layers own different norms, and
  un-scaled output-projection init for placements that define their own depth scaling;
* registers the placement's init rules (B2T's L^-1/2, DeepNorm's beta, ...) in
  ``config.pre_wrap_hooks``, which Megatron-LM runs on the built model chunks before DDP.

Hybrid (``pretrain_hybrid.py``): its builder takes a static ``ModuleSpec``, so each placement has
a ``hybrid_<name>`` stack spec here::

    python pretrain_hybrid.py ... --hybrid-layer-pattern "*-*-*-*-" --spec megaspan.megatron hybrid_spannorm

The stack resolves the placement when Megatron builds it (``L`` = half the pattern's layers),
refuses patterns that are not whole ``*-``/``*E`` blocks, and applies the init rules itself.

Placement options (``model.norm.*`` in megaspan: SpanNorm's switches, Mix-LN's alpha, ...) come
from a YAML mapping in the file named by ``$MEGASPAN_NORM_OPTIONS``; without it, the defaults.
The transformer implementation follows Megatron-LM's ``--transformer-impl`` (``local`` or
``transformer_engine``). Initialisation std is Megatron-LM's ``--init-method-std`` as given
(megaspan's HybridNorm default of 1/sqrt(2.5 d) applies only when its config leaves it unset).
"""

from __future__ import annotations

import os

from megatron.core.transformer.spec_utils import ModuleSpec

from megaspan.models.hybrid import MegaspanHybridStack, check_pattern, hybrid_stack_spec
from megaspan.norms.registry import available

OPTIONS_ENV = "MEGASPAN_NORM_OPTIONS"


def placement_options(name: str):
    """The ``Options`` of placement ``name`` from the YAML file in ``$MEGASPAN_NORM_OPTIONS``."""
    from megaspan.config.loader import load_config, norm_options

    cfg = load_config(None, [f"model.norm_placement={name}"])
    path = os.environ.get(OPTIONS_ENV)
    if path:
        import yaml

        from megaspan.errors import ConfigError

        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(
                f"${OPTIONS_ENV}={path}: cannot read it ({exc.strerror}); point it at a YAML file"
            ) from exc
        if not isinstance(raw, dict):
            raise ConfigError(
                f"${OPTIONS_ENV}={path} must hold a mapping of {name}'s options, e.g. 'final_norm: true'"
            )
        cfg.model.norm = raw
    return norm_options(cfg)


def _transformer(config):
    """The ``TransformerConfig`` behind Megatron-LM's ``GPTModelConfig`` (or itself)."""
    return getattr(config, "transformer", config)


def _impl(tconfig) -> str:
    return "transformer_engine" if tconfig.transformer_impl == "transformer_engine" else "local"


def configure(tconfig, placement) -> None:
    """Set on a ``TransformerConfig`` what ``placement`` needs (as megaspan's own config mapping
    does in :func:`megaspan.models.mcore_config.transformer_config`)."""
    from megatron.core.utils import init_method_normal

    # Stock Megatron-LM's --qk-layernorm composes with the placement (HybridNorm has it anyway).
    tconfig.qk_layernorm = placement.qkv_norm or tconfig.qk_layernorm
    if placement.layer_dependent_slots:
        tconfig.hetereogenous_dist_checkpoint = True
    if not placement.scaled_init:
        tconfig.output_layer_init_method = init_method_normal(tconfig.init_method_std)


class InitRules:
    """A ``pre_wrap_hooks`` entry: the placement's init rules on every built chunk."""

    def __init__(self, placement):
        self.placement = placement

    def __call__(self, model_list):
        from megaspan.models.build import apply_init_rules

        apply_init_rules(model_list, self.placement)
        return model_list


def gpt_block_spec(name: str, config, vp_stage: int | None = None):
    """The block spec of placement ``name`` for Megatron-LM's GPT builder (see the module doc)."""
    from megaspan.models.specs import block_spec
    from megaspan.norms.registry import build_placement

    tconfig = _transformer(config)
    placement = build_placement(name, placement_options(name), tconfig.num_layers)
    configure(tconfig, placement)
    hooks = getattr(config, "pre_wrap_hooks", None)
    if hooks is not None and not any(isinstance(h, InitRules) for h in hooks):
        hooks.append(InitRules(placement))  # once, though the builder calls this per VPP stage
    return block_spec(tconfig, placement, _impl(tconfig), vp_stage=vp_stage)


def _gpt_spec_function(name: str):
    def spec(config, vp_stage: int | None = None):
        return gpt_block_spec(name, config, vp_stage=vp_stage)

    spec.__name__ = spec.__qualname__ = name
    spec.__doc__ = f"``--spec megaspan.megatron {name}``: megaspan's {name} block spec for pretrain_gpt.py."
    return spec


class DropInHybridStack(MegaspanHybridStack):
    """The hybrid stack for ``pretrain_hybrid.py``: resolves the placement from the config it is
    built with (``L`` = half its layers) and applies the placement's init rules itself (a static
    spec cannot register ``pre_wrap_hooks``)."""

    def __init__(self, config, submodules=None, *, placement_name: str, **kwargs):
        from megaspan.norms.registry import build_placement

        check_pattern("".join(kwargs.get("layer_type_list") or []))
        placement = build_placement(placement_name, placement_options(placement_name), config.num_layers // 2)
        configure(config, placement)
        spec = hybrid_stack_spec(placement, _impl(config), config)
        super().__init__(config, spec.submodules, **spec.params, **kwargs)
        for layer in self.layers:
            placement.init_weights(layer)


# Megatron-LM resolves `--spec <module> <name>` with vars(module)[name]: every name is a global.
for _name in available():
    globals()[_name] = _gpt_spec_function(_name)
    globals()[f"hybrid_{_name}"] = ModuleSpec(module=DropInHybridStack, params={"placement_name": _name})

"""Build Megatron-Core ``GPTModel`` chunks from a megaspan config.

Requires ``megaspan.runtime.initialize_model_parallel`` to have run (Megatron reads the
parallel state while building).
"""

from __future__ import annotations

from dataclasses import dataclass

from megaspan.config.loader import norm_options
from megaspan.config.schema import MegaspanConfig
from megaspan.models.backend import resolve_impl
from megaspan.models.mcore_config import model_vocab_size, transformer_config
from megaspan.models.specs import block_spec
from megaspan.norms import Placement, build_placement
from megaspan.norms.layer import NormPlacementTransformerLayer


@dataclass
class BuiltModel:
    chunks: list  # one GPTModel per virtual pipeline stage held by this rank
    config: object  # the TransformerConfig
    placement: Placement
    impl: str
    vocab_size: int  # padded


def placement_for(cfg: MegaspanConfig) -> Placement:
    """The configured placement, with ``model.norm`` resolved to its options."""
    return build_placement(cfg.model.norm_placement, norm_options(cfg), cfg.model.num_layers)


def apply_init_rules(chunks, placement: Placement) -> None:
    """Run the placement's post-Megatron-init weight rules on every layer of every chunk."""
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, NormPlacementTransformerLayer):
                placement.init_weights(module)


def language_model_kwargs(cfg: MegaspanConfig, padded_vocab: int, vp_stage: int | None) -> dict:
    """The constructor arguments ``GPTModel`` and ``HybridModel`` share: vocabulary, positions,
    tied embeddings and this chunk's place in the (virtual) pipeline."""
    from megatron.core import parallel_state as ps

    m = cfg.model
    return dict(
        vocab_size=padded_vocab,
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
    )


def build_model(
    cfg: MegaspanConfig,
    vocab_size: int,
    *,
    init_rules: bool = True,
    cuda: bool | None = None,
) -> BuiltModel:
    """Build this rank's model chunks (pre/post-process flags from the pipeline position)."""
    if cfg.model.arch == "hybrid":
        from megaspan.models.hybrid import build_hybrid_model

        return build_hybrid_model(cfg, vocab_size, init_rules=init_rules, cuda=cuda)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    placement = placement_for(cfg)
    impl = resolve_impl(cfg.model.transformer_impl)
    tconfig = transformer_config(cfg, placement, cuda=cuda, impl=impl)
    padded = model_vocab_size(cfg, vocab_size)
    vp_size = cfg.parallel.virtual_pipeline_model_parallel_size
    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=tconfig,
            transformer_layer_spec=block_spec(tconfig, placement, impl, vp_stage=stage, pp_rank=pp_rank),
            **language_model_kwargs(cfg, padded, stage),
        )
        chunks.append(chunk)
    if init_rules:
        apply_init_rules(chunks, placement)
    return BuiltModel(chunks=chunks, config=tconfig, placement=placement, impl=impl, vocab_size=padded)

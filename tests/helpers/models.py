"""The one tiny-model factory of the test suite.

Every test that needs a small config starts from :func:`tiny_overrides` (4 layers, hidden 64,
4 heads with 2 query groups, fp32) and adds what it tests; :func:`tiny_cfg` loads it through the
real config loader. MoE adds 4 experts, top-2 routing and a 32-wide expert FFN.
"""

from __future__ import annotations

from collections.abc import Iterable

VOCAB = 128
NUM_LAYERS = 4

MOE = (
    "model.moe.num_experts=4",
    "model.moe.router_topk=2",
    "model.moe.ffn_hidden_size=32",
)


def tiny_overrides(
    placement: str = "spannorm",
    moe: bool = False,
    *,
    seq_length: int = 16,
    norm: str = "RMSNorm",
    aux_loss: bool = False,
    extra: Iterable[str] = (),
) -> list[str]:
    """Dotted overrides of a tiny model (see the module doc); ``extra`` comes last and wins."""
    overrides = [
        f"model.norm_placement={placement}",
        f"model.num_layers={NUM_LAYERS}",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",  # GQA: exercises the interleaved QKV layout
        f"model.seq_length={seq_length}",
        f"model.normalization={norm}",
        "model.activation=swiglu" if norm == "RMSNorm" else "model.activation=gelu",
        "precision.dtype=fp32",
    ]
    if moe:
        overrides += list(MOE)
        if not aux_loss:
            overrides.append("model.moe.aux_loss_coeff=0")
    return overrides + list(extra)


def tiny_cfg(placement: str = "spannorm", moe: bool = False, **kwargs):
    """:func:`tiny_overrides` loaded into a :class:`~megaspan.config.schema.MegaspanConfig`."""
    from megaspan.config.loader import load_config

    return load_config(None, tiny_overrides(placement, moe, **kwargs))


def stack_cfg(
    placement: str = "spannorm", moe: bool = False, norm: str = "RMSNorm", extra: Iterable[str] = ()
):
    """Tiny config for tests that run the decoder stack directly, like the reference stack: 8 tokens
    and no position embedding (the reference has none)."""
    return tiny_cfg(
        placement, moe, seq_length=8, norm=norm, extra=("model.position_embedding_type=none", *extra)
    )


# `megaspan plan` inputs: a vocab size (no tokenizer needed) and a batch every tested layout divides.
SMALL_MOE = tiny_overrides(
    moe=True,
    aux_loss=True,
    extra=("model.vocab_size=128", "training.micro_batch_size=1", "training.global_batch_size=8"),
)

"""Transformer Engine backend and FP8 (GPU only; skipped cleanly without CUDA + TE).

Checks that every placement builds with the TE spec, that a local-backend checkpoint loads into
the TE model through megaspan's loader (the local spec maps fused-norm keys to TE's names; the
TE norms' extra state is absent from it) with the same outputs, and
that FP8 forward/backward runs.
"""

from __future__ import annotations

import pytest
import torch

from megaspan.config.loader import load_config
from megaspan.models import build_model
from megaspan.norms import available

pytestmark = [pytest.mark.gpu, pytest.mark.te]


# Not the tiny factory: TE-vs-local sizes (hidden 128, 64 tokens, MHA) kept as measured on a GPU; unchecked off one.
def cfg_for(placement, impl, extra=()):
    return load_config(
        None,
        [
            f"model.norm_placement={placement}",
            f"model.transformer_impl={impl}",
            "model.num_layers=4",
            "model.hidden_size=128",
            "model.num_attention_heads=4",
            "model.seq_length=64",
            "precision.dtype=fp32",
            *extra,
        ],
    )


@pytest.fixture
def gpu_mcore(single_process_group):
    from megaspan.config.schema import ParallelConfig
    from megaspan.runtime import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)
    yield


@pytest.mark.parametrize("placement", list(available()))
def test_te_checkpoint_interchangeable_with_local(gpu_mcore, tmp_path, placement):
    from megatron.core import dist_checkpointing

    from megaspan.training.checkpoint import load_model_weights

    local = build_model(cfg_for(placement, "local"), vocab_size=256, cuda=True).chunks[0].cuda()
    te = build_model(cfg_for(placement, "transformer_engine"), vocab_size=256, cuda=True).chunks[0].cuda()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    # Through megaspan's loader: TE's norm ops carry `_extra_state` keys a local checkpoint
    # lacks, which dist_checkpointing's default strictness refuses ("Missing key").
    load_model_weights(tmp_path, [te])
    tokens = torch.randint(0, 256, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    local.eval(), te.eval()
    # TE runs fp32 GEMMs with cuBLASLt's fast-TF32 compute type whatever torch's flags say; let
    # the local model use TF32 too and compare at TF32's precision (10-bit mantissa, ~1e-3 per
    # GEMM, compounded over 4 layers), not fp32's.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():
            a = local(tokens, pos, None)
            b = te(tokens, pos, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("placement", ["spannorm", "pre", "b2t", "hybridnorm"])
def test_fp8_forward_backward(gpu_mcore, placement):
    cfg = cfg_for(
        placement,
        "transformer_engine",
        ("precision.dtype=bf16", "precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"),
    )
    model = build_model(cfg, vocab_size=256, cuda=True).chunks[0].cuda()
    tokens = torch.randint(0, 256, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)

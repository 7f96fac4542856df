"""``megaspan plan``'s memory estimate equals a hand computation for the tiny recipe.

8 GPUs as TP2 x PP2 x DP2, bf16 weights, fp32 gradient reduction, distributed optimizer. The
tiny model: h=64, 4 heads (no GQA), SwiGLU FFN of 256 (8/3 h = 170.7 rounded up to a multiple
of 128, megaspan.config.derived.FFN_MULTIPLE), vocab 512, 2 layers of SpanNorm (layer 1 also
owns the input norm N0; no final norm), untied embeddings. Per TP rank (TP splits every matrix,
not the norm gains):

    embedding  512 * 64 / 2                  = 16384   (stage 0)
    output     512 * 64 / 2                  = 16384   (stage 1)
    QKV        3 * 64 * 64 / 2               =  6144   per layer
    proj       64 * 64 / 2                   =  2048
    FFN        (2 * 256 * 64 + 256 * 64) / 2 = 24576
    norms      64 per norm: 3 in layer 1, 2 in layer 2

Stage 0: 16384 + 6144 + 2048 + 24576 + 192 = 49344; stage 1: 6144 + 2048 + 24576 + 128 + 16384
= 49280. Bytes: weights 2 per parameter (bf16), gradients 4 (fp32 reduction), Adam 12 (fp32
master + two moments) divided over DP=2. Activations (Korthikanti et al. 2022, no sequence
parallelism): s*b*h * (10 + 24 / TP) per layer = 64*4*64 * 22 = 360448 with one micro-batch in
flight (with sequence parallelism 34 * s*b*h / TP = 278528); the last stage adds fp32 logits
4 * s*b * vocab / TP = 262144.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import run_plan

pytestmark = pytest.mark.integration  # `megaspan plan`: torch, Megatron and fake process groups

OVERRIDES = [
    "parallel.tensor_model_parallel_size=2",
    "parallel.pipeline_model_parallel_size=2",
    "parallel.use_distributed_optimizer=true",
    "precision.dtype=bf16",
    "precision.grad_reduce_in_fp32=true",
    "model.share_embeddings_and_output_weights=false",
]
STAGE_PARAMS = [16384 + 6144 + 2048 + 24576 + 3 * 64, 6144 + 2048 + 24576 + 2 * 64 + 16384]
SBH = 64 * 4 * 64
LAYER_ACTIVATIONS = {
    False: SBH * (10 + (5 + 19) / 2),
    # Sequence parallelism also splits the 10*sbh that TP alone replicates (LayerNorms, dropouts,
    # the attention and MLP inputs): 34*sbh / TP (Korthikanti et al. 2022, eq. 4).
    True: SBH * 34 / 2,
}
LOGITS = 4 * 64 * 4 * 512 / 2


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp-sp"])
def test_memory_estimate_matches_a_hand_computation(sequence_parallel):
    proc = run_plan(
        8,
        [*OVERRIDES, f"parallel.sequence_parallel={str(sequence_parallel).lower()}"],
        "--json",
        "--config",
        "tiny",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert (result["layout"]["tp"], result["layout"]["pp"], result["layout"]["dp"]) == (2, 2, 2)
    assert [s["shard"]["total"] for s in result["stages"]] == STAGE_PARAMS
    for stage, params in zip(result["stages"], STAGE_PARAMS):
        memory = stage["memory"]
        assert memory["weights"] == 2 * params
        assert memory["grads"] == 4 * params
        assert memory["optimizer"] == 12 * params / 2
        expected = LAYER_ACTIVATIONS[sequence_parallel] + (LOGITS if stage["stage"] == 1 else 0)
        assert memory["activations"] == pytest.approx(expected)
        assert memory["total"] == pytest.approx(2 * params + 4 * params + 6 * params + expected)

"""Vocabulary padding: ``model.make_vocab_size_divisible_by`` and ``model.vocab_padding``.

``megatron`` pads as Megatron-LM does (a multiple of divisible_by x TP); ``reshardable`` (the
default) keeps the padded size independent of TP where TP divides divisible_by. Hand-computed
values, the built model's embedding, the planner, the one-process config of generate/eval/export,
and what a checkpoint of another padding loads.
"""

from __future__ import annotations

import pytest
import torch

from megaspan.config.loader import load_config
from megaspan.errors import CheckpointError, ConfigError
from megaspan.models.mcore_config import model_vocab_size, padded_vocab_size
from tests.helpers.models import tiny_overrides


@pytest.mark.parametrize(
    "vocab, tp, divisible_by, reshardable, megatron",
    [
        (32000, 1, 128, 32000, 32000),
        (32000, 2, 128, 32000, 32000),  # 32000 = 125 x 256
        (32000, 4, 128, 32000, 32256),  # 63 x 512
        (32000, 8, 128, 32000, 32768),  # 32 x 1024
        (32000, 3, 128, 32256, 32256),  # 3 does not divide 128: both pad to 84 x 384
        (50257, 1, 128, 50304, 50304),  # GPT-2: 393 x 128
        (50257, 8, 128, 50304, 51200),  # 50 x 1024
        (128256, 8, 128, 128256, 129024),  # Llama-3: 126 x 1024
        (1000, 2, 96, 1056, 1152),  # 96 is divisible by 2: 11 x 96; megatron: 6 x 192
        (1000, 1, 1, 1000, 1000),
    ],
)
def test_padded_vocab_size_by_hand(vocab, tp, divisible_by, reshardable, megatron):
    assert padded_vocab_size(vocab, tp, divisible_by, "reshardable") == reshardable
    assert padded_vocab_size(vocab, tp, divisible_by, "megatron") == megatron
    for size in (reshardable, megatron):
        assert size >= vocab and size % tp == 0  # every TP rank holds an equal shard


def _cfg(*extra: str):
    return load_config(None, tiny_overrides(extra=extra))


def test_the_config_picks_the_rule_and_the_multiple():
    assert model_vocab_size(_cfg(), 32000, 8) == 32000
    megatron = _cfg("model.vocab_padding=megatron")
    assert model_vocab_size(megatron, 32000, 8) == 32768
    assert model_vocab_size(_cfg("model.make_vocab_size_divisible_by=64"), 1000, 1) == 1024
    from megaspan.config.validate import check_sizes

    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by must be >= 1"):
        check_sizes(_cfg("model.make_vocab_size_divisible_by=0"))
    with pytest.raises(ConfigError, match="vocab_padding"):
        _cfg("model.vocab_padding=llama")


def test_the_built_model_uses_it(mcore):
    from megaspan.models import build_model

    cfg = _cfg("model.make_vocab_size_divisible_by=96", "model.vocab_padding=megatron")
    built = build_model(cfg, 128)
    assert built.vocab_size == 192  # 2 x 96 >= 128
    assert built.chunks[0].embedding.word_embeddings.weight.shape[0] == 192


@pytest.mark.integration
def test_the_plan_uses_it():
    from tests.helpers.cli import plan_json

    tp4 = tiny_overrides(
        extra=(
            "model.vocab_size=1100",
            "model.num_attention_heads=8",
            "model.num_query_groups=8",
            "parallel.tensor_model_parallel_size=4",
            "training.micro_batch_size=1",
            "training.global_batch_size=8",
        )
    )
    megatron = plan_json(4, [*tp4, "model.vocab_padding=megatron"])
    reshardable = plan_json(4, tp4)
    assert (megatron["vocab_size"], reshardable["vocab_size"]) == (1536, 1152)  # 3 x 512, 9 x 128


def test_generate_eval_export_keep_the_saving_layouts_padding():
    from megaspan.config.loader import config_to_dict
    from megaspan.evaluate.model import config_for_one_process

    saved = _cfg(
        "model.vocab_padding=megatron",
        "model.num_attention_heads=8",
        "model.num_query_groups=8",
        "parallel.tensor_model_parallel_size=4",
    )
    one = config_for_one_process(config_to_dict(saved))
    assert one.parallel.tensor_model_parallel_size == 1
    assert model_vocab_size(one, 32000) == model_vocab_size(saved, 32000) == 32256
    plain = config_for_one_process(config_to_dict(_cfg("parallel.tensor_model_parallel_size=2")))
    assert model_vocab_size(plain, 32000) == 32000


def test_a_checkpoint_of_another_padding_loads_weights_but_not_the_full_state(mcore, tmp_path):
    """Megatron-Core marks the embedding and output rows ``allow_shape_mismatch``: the weights of
    another padding load (the real rows; extra padding rows are zero), a full resume does not."""
    from megaspan.training.checkpoint import Progress, load_checkpoint, save_checkpoint
    from megaspan.training.setup import build_training_objects

    saved = build_training_objects(_cfg(), 128)  # 128 rows
    path = save_checkpoint(tmp_path, Progress(1, 4), saved.chunks, saved.optimizer, saved.scheduler, {}, None)
    other = build_training_objects(_cfg("model.make_vocab_size_divisible_by=256"), 128)  # 256 rows
    load_checkpoint(path, other.chunks, other.optimizer, other.scheduler, load_optimizer=False)
    rows = other.chunks[0].embedding.word_embeddings.weight
    assert rows.shape[0] == 256
    assert torch.equal(rows[:128], saved.chunks[0].embedding.word_embeddings.weight)
    assert not rows[128:].any()
    other = build_training_objects(_cfg("model.make_vocab_size_divisible_by=256"), 128)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, other.chunks, other.optimizer, other.scheduler)
    text = str(err.value)
    assert "\n" not in text and "checkpoint.load_optimizer=false" in text

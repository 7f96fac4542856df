"""Layout validation: every inconsistent combination fails in milliseconds with one line.

Each case mirrors a constraint Megatron-Core enforces later (TransformerConfig.__post_init__,
parallel_state, the schedules or megatron/training/arguments.py) as an assertion deep inside
model construction, or not at all on CPU.
"""

from __future__ import annotations

import pytest

from megaspan.config import Capabilities, load_config, validate
from megaspan.errors import UserError

MOE = ["model.moe.num_experts=8"]


def machine(cuda: bool) -> Capabilities:
    return Capabilities.gpu() if cuda else Capabilities.cpu()


TP2 = ["parallel.tensor_model_parallel_size=2"]
PP2 = ["parallel.pipeline_model_parallel_size=2"]

BAD = [
    # (overrides, world size, cuda, text the message must contain)
    (MOE + ["model.add_bias_linear=true"], 1, False, "model.add_bias_linear=true with MoE"),
    (
        ["model.num_attention_heads=6", "model.hidden_size=384", "parallel.tensor_model_parallel_size=4"],
        4,
        False,
        "num_attention_heads=6 is not divisible by parallel.tensor_model_parallel_size=4",
    ),
    (
        [
            "model.num_query_groups=3",
            "model.num_attention_heads=12",
            "model.hidden_size=384",
            "parallel.tensor_model_parallel_size=2",
        ],
        8,
        False,
        "num_query_groups=3 and parallel.tensor_model_parallel_size=2",
    ),
    (["parallel.pipeline_model_parallel_size=3"], 3, False, "not divisible into 3 pipeline stages"),
    (
        ["model.num_layers=8", *PP2, "parallel.virtual_pipeline_model_parallel_size=3"],
        2,
        False,
        "x 3 virtual stages",
    ),
    (
        ["model.num_layers=8", *PP2, "parallel.num_layers_in_first_pipeline_stage=0"],
        2,
        False,
        "num_layers_in_first_pipeline_stage must be >= 1",
    ),
    (
        [
            "model.num_layers=8",
            *PP2,
            "parallel.num_layers_in_first_pipeline_stage=3",
            "parallel.num_layers_in_last_pipeline_stage=3",
        ],
        2,
        False,
        "does not split into 2 pipeline stages",
    ),
    (
        [
            "model.num_layers=10",
            "parallel.pipeline_model_parallel_size=3",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.num_layers_in_first_pipeline_stage=3",
            "parallel.num_layers_in_last_pipeline_stage=3",
        ],
        3,
        False,
        "num_layers_in_first_pipeline_stage=3 is not divisible",
    ),
    (["parallel.virtual_pipeline_model_parallel_size=2"], 1, False, "needs pipeline_model_parallel_size > 1"),
    (
        ["model.moe.num_experts=6", "parallel.expert_model_parallel_size=4"],
        4,
        False,
        "num_experts=6 is not divisible",
    ),
    ([*MOE, *TP2], 2, False, "needs parallel.sequence_parallel=true"),
    (
        ["parallel.expert_model_parallel_size=2"],
        2,
        False,
        "expert_model_parallel_size > 1 needs an MoE model",
    ),
    (["parallel.expert_tensor_parallel_size=2"], 2, False, "expert_tensor_parallel_size needs an MoE model"),
    (
        [
            *MOE,
            "model.moe.ffn_hidden_size=100",
            "parallel.expert_tensor_parallel_size=8",
            "parallel.expert_model_parallel_size=1",
        ],
        8,
        False,
        "expert FFN size 100",
    ),
    ([*MOE, "model.moe.router_topk=9"], 1, False, "router_topk=9 > model.moe.num_experts=8"),
    ([*MOE, "model.moe.grouped_gemm=true"], 1, False, "grouped_gemm=true needs a GPU"),
    ([*MOE, "parallel.expert_model_parallel_size=8"], 4, False, "not divisible by EP*ETP*PP"),
    (["parallel.context_parallel_size=2"], 2, False, "needs Transformer Engine attention on GPUs"),
    (
        ["parallel.context_parallel_size=3", "model.seq_length=256"],
        3,
        True,
        "divisible by 2 x parallel.context_parallel_size",
    ),
    (
        ["parallel.sequence_parallel=true"],
        1,
        False,
        "sequence_parallel=true needs parallel.tensor_model_parallel_size > 1",
    ),
    (
        [*TP2, "parallel.sequence_parallel=true", "model.seq_length=255"],
        2,
        False,
        "seq_length=255 is not divisible",
    ),
    (["model.ffn_hidden_size=1001", *TP2], 2, False, "FFN hidden size 1001"),
    (TP2, 3, False, "world size 3 is not divisible by TP*PP*CP"),
    (["training.global_batch_size=6", "training.micro_batch_size=4"], 2, False, "global_batch_size=6"),
    (
        [
            "model.num_layers=8",
            *PP2,
            "parallel.virtual_pipeline_model_parallel_size=2",
            "training.global_batch_size=6",
            "training.micro_batch_size=2",
        ],
        2,
        False,
        "multiple of parallel.pipeline_model_parallel_size=2",
    ),
    (
        ["parallel.recompute_granularity=full"],
        1,
        False,
        "recompute_granularity=full needs parallel.recompute_method",
    ),
    (["parallel.recompute_method=uniform"], 1, False, "only apply to parallel.recompute_granularity=full"),
    (
        ["parallel.recompute_granularity=selective", "parallel.recompute_num_layers=2"],
        1,
        False,
        "only apply to parallel.recompute_granularity=full",
    ),
    (
        ["parallel.overlap_param_gather=true"],
        1,
        False,
        "overlap_param_gather=true needs parallel.use_distributed_optimizer",
    ),
    (["parallel.tensor_model_parallel_size=0"], 1, False, "tensor_model_parallel_size must be >= 1"),
    # Each of these passed validate() once its own check was removed (mutation audit, issue 21).
    (["model.hidden_size=100", "model.num_attention_heads=8"], 1, False, "hidden_size=100 is not divisible"),
    (
        ["model.hidden_size=512", "model.num_attention_heads=8", "model.num_query_groups=3"],
        1,
        False,
        "num_attention_heads=8 is not divisible by model.num_query_groups=3",
    ),
    (["parallel.num_layers_in_first_pipeline_stage=1"], 1, False, "need pipeline_model_parallel_size > 1"),
    (["parallel.num_layers_in_last_pipeline_stage=1"], 1, False, "need pipeline_model_parallel_size > 1"),
    (
        [
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=uniform",
            "parallel.recompute_num_layers=0",
        ],
        1,
        False,
        "parallel.recompute_num_layers",
    ),
    (
        ["checkpoint.load_optimizer=false"],
        1,
        False,
        "checkpoint.load_optimizer=false needs checkpoint.resume=<path",
    ),
]


@pytest.mark.parametrize("overrides,world,cuda,needle", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_layout_is_one_line(overrides, world, cuda, needle):
    cfg = load_config(None, overrides)
    with pytest.raises(UserError) as exc:
        validate(cfg, world, machine(cuda))
    message = str(exc.value)
    assert "\n" not in message
    assert needle in message, message


GOOD = [
    # The layouts the distributed tests and the 512-GPU plan use must all pass.
    ([*TP2, "parallel.sequence_parallel=true", *MOE], 2, False),
    (
        [
            "model.num_layers=4",
            *PP2,
            "parallel.virtual_pipeline_model_parallel_size=2",
            "training.micro_batch_size=2",
        ],
        2,
        False,
    ),
    (
        [
            "model.num_layers=4",
            *PP2,
            "parallel.num_layers_in_first_pipeline_stage=1",
            "parallel.num_layers_in_last_pipeline_stage=3",
        ],
        2,
        False,
    ),
    (
        [
            *MOE,
            "parallel.expert_model_parallel_size=2",
            "parallel.use_distributed_optimizer=true",
            "training.micro_batch_size=2",
        ],
        4,
        False,
    ),
    (["parallel.context_parallel_size=2", "model.seq_length=256"], 2, True),
    (
        [
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=uniform",
            "parallel.recompute_num_layers=1",
        ],
        1,
        False,
    ),
    (
        [
            "parallel.tensor_model_parallel_size=8",
            "parallel.sequence_parallel=true",
            "parallel.pipeline_model_parallel_size=8",
            "parallel.expert_model_parallel_size=8",
            "model.num_layers=64",
            "model.hidden_size=8192",
            "model.num_attention_heads=64",
            "model.num_query_groups=8",
            "model.moe.num_experts=64",
            "training.global_batch_size=512",
            "training.micro_batch_size=1",
        ],
        512,
        True,
    ),
]


@pytest.mark.parametrize("overrides,world,cuda", GOOD)
def test_good_layout_passes(overrides, world, cuda):
    layout = validate(load_config(None, overrides), world, machine(cuda))
    assert layout.world_size == world


H100_OLD_TE = Capabilities(
    cuda=True, te=True, te_version="2.1.0", device_name="H100", compute_capability=(9, 0)
)
H100 = Capabilities(cuda=True, te=True, te_version="2.8.0+abc", device_name="H100", compute_capability=(9, 0))
A100 = Capabilities(cuda=True, te=True, te_version="2.8.0", device_name="A100", compute_capability=(8, 0))
GPU_NO_TE = Capabilities(cuda=True, te=False, device_name="H100", compute_capability=(9, 0))

MACHINE_BAD = [
    # (overrides, machine, text the message must contain)
    (
        ["model.transformer_impl=transformer_engine"],
        Capabilities.cpu(),
        "Transformer Engine is not installed",
    ),
    (["model.transformer_impl=transformer_engine"], GPU_NO_TE, "model.transformer_impl=local"),
    (["model.transformer_impl=transformer_engine"], Capabilities(te=True), "needs a CUDA GPU"),
    (["precision.fp8=hybrid"], Capabilities.cpu(), "precision.fp8=hybrid needs Transformer Engine"),
    (["precision.fp8=hybrid"], GPU_NO_TE, "needs Transformer Engine"),
    (["precision.fp8=e4m3"], Capabilities(te=True), "needs an H100-class GPU"),
    (["precision.fp8=e4m3"], A100, "compute capability >= 8.9"),
    (
        ["precision.fp8=e4m3", "precision.fp8_recipe=mxfp8"],
        H100,
        "fp8_recipe=mxfp8 needs compute capability >= 10.0",
    ),
    (
        ["precision.fp8=e4m3", "precision.fp8_recipe=tensorwise"],
        H100_OLD_TE,
        "needs Transformer Engine >= 2.2",
    ),
    (
        ["precision.fp8=e4m3", "precision.fp8_recipe=blockwise"],
        H100_OLD_TE,
        "needs Transformer Engine >= 2.3",
    ),
    (["precision.fp8=e4m3", "precision.first_last_layers_bf16=true"], H100, "first_last_layers_bf16=true"),
]


@pytest.mark.parametrize("overrides,caps,needle", MACHINE_BAD, ids=[b[2][:40] for b in MACHINE_BAD])
def test_machine_checks_are_one_line(overrides, caps, needle):
    with pytest.raises(UserError) as exc:
        validate(load_config(None, overrides), 1, caps)
    assert "\n" not in str(exc.value) and needle in str(exc.value), str(exc.value)


@pytest.mark.parametrize(
    "overrides,caps",
    [
        (["precision.fp8=e4m3", "precision.fp8_recipe=delayed"], H100_OLD_TE),
        (
            ["precision.fp8=e4m3", "precision.fp8_recipe=mxfp8"],
            Capabilities(cuda=True, te=True, te_version="2.8.0", compute_capability=(10, 0)),
        ),
        (
            ["precision.fp8=e4m3", "precision.fp8_recipe=blockwise"],
            Capabilities(cuda=True, te=True, te_version="2.3.0.dev0"),
        ),
        (["model.transformer_impl=transformer_engine", "precision.fp8=hybrid"], Capabilities.gpu()),
        # Machine unknown: the machine checks are skipped, the config checks still run.
        (["model.transformer_impl=transformer_engine", "precision.fp8=hybrid"], None),
    ],
)
def test_machine_checks_pass(overrides, caps):
    validate(load_config(None, overrides), 1, caps)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["schedule.warmup_steps=400"], "schedule.warmup_steps=400 must be <"),
        (["training.steps=0"], "training.steps must be >= 1"),
        (["optimizer.min_lr=1"], "optimizer.min_lr=1.0 must be in"),
        (["schedule.decay_style=WSD"], "needs schedule.wsd_decay_steps"),
        (["checkpoint.save_interval=0"], "checkpoint.save_interval must be >= 1"),
    ],
)
def test_schedule_checks_run_in_validate(overrides, needle):
    """The schedule checks run for every caller of validate (train and plan), not only `train`."""
    with pytest.raises(UserError) as exc:
        validate(load_config(None, overrides), 1, Capabilities.cpu())
    assert needle in str(exc.value)


def test_layout_arithmetic():
    cfg = load_config(
        None,
        [
            *TP2,
            "parallel.pipeline_model_parallel_size=2",
            "model.num_layers=4",
            "training.micro_batch_size=2",
            "training.global_batch_size=16",
        ],
    )
    layout = validate(cfg, 8, Capabilities.cpu())
    assert (layout.world_size, layout.tp, layout.pp, layout.cp, layout.dp) == (8, 2, 2, 1, 2)
    assert (layout.micro_batch_size, layout.global_batch_size, layout.num_microbatches) == (2, 16, 4)
    assert (layout.etp, layout.ep, layout.expert_dp, layout.ranks_per_stage) == (2, 1, 2, 4)

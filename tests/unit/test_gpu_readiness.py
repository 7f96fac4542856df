"""The GPU paths a CPU can check: FP8 shape rules, backend-dependent refusals, the kernel fusions
and the deterministic default (issue "Ready for the first H100 run"; docs/gpu.md lists what only
a GPU can show, in tests/gpu and tools/gpu_check.sh).

Every check here runs megaspan's real validation / Megatron-Core's real ``TransformerConfig`` on
this CPU machine, with a :class:`Capabilities` value standing for the H100 node.
"""

from __future__ import annotations

import os

import pytest
import torch

from megaspan.config import Capabilities, load_config, validate
from megaspan.config.derived import FFN_MULTIPLE, deterministic, ffn_hidden_size
from megaspan.errors import UserError
from megaspan.models.build import placement_for
from megaspan.models.mcore_config import (
    FUSED_SOFTMAX_KERNELS,
    GRAD_ACCUM_KERNEL,
    fusion_flags,
    transformer_config,
)

H100 = Capabilities(
    cuda=True, te=True, te_version="2.17.1", device_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0)
)
H100_NO_TE = Capabilities(cuda=True, te=False, device_name="NVIDIA H100", compute_capability=(9, 0))
FP8 = ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"]


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def refused(overrides, world: int = 1, caps: Capabilities = H100) -> str:
    with pytest.raises(UserError) as info:
        validate(cfg(*overrides), world, caps)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- FP8 shapes (TE's assert_dim_for_fp8_exec: last dim % 16, leading dims % 8) ----------------


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("hidden", [1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192])
def test_default_ffn_is_fp8_aligned_for_every_tp(hidden, tp):
    """The derived SwiGLU FFN passes FP8 validation at every power-of-two TP <= 8 (it was rounded
    to 64: h=4096/TP=8 gave 1368 per rank and the first FP8 GEMM died)."""
    c = cfg(
        *FP8,
        f"model.hidden_size={hidden}",
        f"model.num_attention_heads={hidden // 64}",
        f"parallel.tensor_model_parallel_size={tp}",
        "parallel.sequence_parallel=" + ("true" if tp > 1 else "false"),
        "model.seq_length=2048",
        "training.micro_batch_size=1",
        f"training.global_batch_size={8 // tp}",
    )
    ffn = ffn_hidden_size(c.model)
    assert ffn % FFN_MULTIPLE == 0 and ffn >= 8 * hidden / 3
    validate(c, 8, H100)


def test_llama_sizes():
    assert ffn_hidden_size(cfg("model.hidden_size=4096").model) == 11008  # LLaMA-7B's FFN


@pytest.mark.parametrize(
    "overrides, world, needle",
    [
        # The audit's case: an explicit FFN rounded to 64 only, TP 8.
        (
            [
                "model.hidden_size=4096",
                "model.num_attention_heads=32",
                "model.ffn_hidden_size=10944",
                "parallel.tensor_model_parallel_size=8",
                "training.global_batch_size=1",
                "training.micro_batch_size=1",
            ],
            8,
            "FFN width per TP rank",
        ),
        (
            ["model.hidden_size=200", "model.num_attention_heads=5", "model.ffn_hidden_size=512"],
            1,
            "model.hidden_size divisible by 16",
        ),
        (
            [
                "model.hidden_size=32",
                "model.num_attention_heads=4",
                "model.ffn_hidden_size=128",
                "parallel.tensor_model_parallel_size=4",
                "training.global_batch_size=1",
                "training.micro_batch_size=1",
            ],
            4,
            "attention width per TP rank",
        ),
        (
            ["model.moe.num_experts=8", "model.moe.ffn_hidden_size=1000"],
            1,
            "expert FFN width per expert-TP rank",
        ),
        (
            ["model.hidden_size=16", "model.num_attention_heads=8", "model.num_query_groups=1"],
            1,
            "fused QKV rows",
        ),
        (["model.seq_length=250", "training.micro_batch_size=1", "training.global_batch_size=1"], 1, "= 250"),
        (
            [
                "model.seq_length=264",
                "training.micro_batch_size=1",
                "training.global_batch_size=1",
                "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true",
            ],
            2,
            "(SP) = 132",
        ),
    ],
)
def test_fp8_shape_rule_refused(overrides, world, needle):
    message = refused([*FP8, *overrides], world)
    assert needle in message and "precision.fp8" in message
    # Without FP8 the same layout is fine: only the FP8 rule refused it.
    validate(cfg(*overrides), world, H100)


def test_fp8_shape_rules_also_judge_plan_layouts():
    """`megaspan plan` validates with unknown-version GPU capabilities: the shape rule still applies."""
    with pytest.raises(UserError, match="FFN width per TP rank"):
        validate(
            cfg(
                *FP8,
                "model.hidden_size=4096",
                "model.num_attention_heads=32",
                "model.ffn_hidden_size=10944",
                "parallel.tensor_model_parallel_size=8",
                "training.global_batch_size=64",
            ),
            512,
            Capabilities.gpu(),
        )


# ---- backend-dependent refusals ---------------------------------------------------------------


def test_fp8_on_the_local_backend_is_refused():
    """mcore's local linears have no FP8 path: this ran (and benched) as bf16 labelled FP8."""
    assert "local backend" in refused([*FP8, "model.transformer_impl=local"])
    validate(cfg(*FP8, "model.transformer_impl=auto"), 1, H100)


def test_document_masking_is_refused_on_te():
    """TE attention has a causal mask type and ignores attention_mask: documents would not be masked."""
    assert "data.reset_attention_mask" in refused(["data.reset_attention_mask=true"])
    validate(cfg("data.reset_attention_mask=true", "model.transformer_impl=local"), 1, H100)
    validate(cfg("data.reset_attention_mask=true"), 1, Capabilities.cpu())


def test_context_parallel_needs_te_attention():
    cp2 = ["parallel.context_parallel_size=2", "training.global_batch_size=8"]
    assert "context_parallel_size" in refused([*cp2, "model.transformer_impl=local"], 2)
    assert "context_parallel_size" in refused(cp2, 2, H100_NO_TE)
    validate(cfg(*cp2), 2, H100)


def test_permute_fusion_needs_te():
    moe = ["model.moe.num_experts=4", "model.moe.permute_fusion=true"]
    assert "permute_fusion" in refused(moe, 1, Capabilities.cpu())
    assert "permute_fusion" in refused([*moe, "model.transformer_impl=local"])
    validate(cfg(*moe), 1, H100)


# ---- kernel fusions -----------------------------------------------------------------------------

NO_KERNELS: dict[str, bool] = {}
APEX = {k: True for k in (*FUSED_SOFTMAX_KERNELS, GRAD_ACCUM_KERNEL)}


def test_fusions_off_on_cpu():
    assert not any(fusion_flags(False, "local", APEX).values())


def test_fusions_with_te():
    flags = fusion_flags(True, "transformer_engine", NO_KERNELS)
    assert flags["bias_activation_fusion"] and flags["apply_rope_fusion"]
    # The output layer is a local ColumnParallelLinear: it refuses gradient-accumulation fusion
    # without Apex's kernel, whatever the rest of the model runs on.
    assert not flags["gradient_accumulation_fusion"] and not flags["masked_softmax_fusion"]
    assert fusion_flags(True, "transformer_engine", APEX)["gradient_accumulation_fusion"]


def test_local_backend_on_cuda_enables_only_installed_kernels():
    flags = fusion_flags(True, "local", NO_KERNELS)
    assert not flags["apply_rope_fusion"] and not flags["masked_softmax_fusion"]
    assert not flags["gradient_accumulation_fusion"] and not flags["bias_activation_fusion"]
    assert fusion_flags(True, "local", APEX)["masked_softmax_fusion"]


def test_local_backend_on_cuda_builds_a_config_without_te():
    """Megatron-Core's TransformerConfig itself (no TE on this machine) accepts the local
    backend's GPU config: apply_rope_fusion=True used to raise 'apply_rope_fusion is not available'."""
    c = cfg("model.transformer_impl=local", "model.moe.num_experts=4")
    tc = transformer_config(c, placement_for(c), cuda=True, impl="local")
    assert not tc.apply_rope_fusion and not tc.gradient_accumulation_fusion
    assert not tc.moe_permute_fusion  # TE's kernels
    assert tc.moe_router_dtype == "fp32"  # fp32 routing on GPU


def test_cpu_config_unchanged():
    c = cfg("model.moe.num_experts=4")
    tc = transformer_config(c, placement_for(c), cuda=False, impl="local")
    assert not tc.bias_activation_fusion and not tc.moe_permute_fusion and tc.moe_router_dtype is None


# ---- deterministic mode ----------------------------------------------------------------------------


def test_deterministic_default_per_device():
    assert deterministic(cfg(), cuda=False) is True
    assert deterministic(cfg(), cuda=True) is False
    assert deterministic(cfg("training.deterministic=true"), cuda=True) is True
    assert deterministic(cfg("training.deterministic=false"), cuda=False) is False


def test_seed_everything_applies_the_mode():
    from megaspan.training.build import seed_everything

    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(1, False)
        assert not torch.are_deterministic_algorithms_enabled()
        seed_everything(1, True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


# ---- FP8 checkpoints: Transformer Engine's pickle opt-in ---------------------------------------

OPT_IN = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def test_fp8_delayed_runs_opt_in_to_te_extra_state(monkeypatch):
    """TE 2.17 refuses delayed scaling's pickled extra state unless opted in: resume would fail."""
    from megaspan.models import allow_fp8_extra_state

    monkeypatch.delenv(OPT_IN, raising=False)
    assert not allow_fp8_extra_state(cfg(*FP8))  # tensorwise stores nothing pickled: left alone
    assert OPT_IN not in os.environ
    assert allow_fp8_extra_state(cfg("precision.fp8=hybrid", "precision.fp8_recipe=delayed"))
    assert os.environ[OPT_IN] == "1"
    monkeypatch.setenv(OPT_IN, "0")  # the user's explicit refusal wins
    assert not allow_fp8_extra_state(cfg("precision.fp8=hybrid", "precision.fp8_recipe=delayed"))


def test_launchers_set_the_opt_in_on_gpu_nodes():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = f'source {root}/launch/env.sh; megaspan_gpu_env_defaults; echo "${{{OPT_IN}:-unset}}"'
    env = {"PATH": "/usr/bin:/bin", "MEGASPAN_GPU": "1"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env[OPT_IN] = "0"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


# ---- the image ----------------------------------------------------------------------------------


def _docker(name: str) -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[2] / "docker" / name).read_text()


def test_image_sets_the_opt_in_and_builds_te_without_nccl_ep():
    text = _docker("Dockerfile")
    assert f"{OPT_IN}=1" in text.split("\nENV PYTHONUNBUFFERED", 1)[1]
    te_build = text[text.index("building Transformer Engine") : text.index("transformer-engine @ git+")]
    assert "NVTE_WITH_NCCL_EP=0" in te_build
    assert "--require" in text and "matplotlib" in text.split("--require", 1)[1]
    assert any(line.startswith("matplotlib") for line in _docker("requirements-image.txt").splitlines())


def test_version_record_fails_on_a_missing_package():
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "docker" / "record_versions.py"
    ok = subprocess.run(
        [sys.executable, str(tool), "--require", "torch", "megatron-core", "module:json"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [
            sys.executable,
            str(tool),
            "--require",
            "torch",
            "transformer-engine",
            "module:fused_weight_gradient_mlp_cuda",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "transformer-engine" in bad.stderr and "fused_weight_gradient_mlp_cuda" in bad.stderr


# ---- the device is the local rank's, before set_device ---------------------------------------


def test_capabilities_describe_the_local_ranks_device(monkeypatch):
    """Before ``set_device`` every rank's current device is 0: the capability queries must name
    LOCAL_RANK's device (modulo the visible ones, as init_process_group later picks it). The CUDA
    driver calls are stood in for (no GPU here); what is checked is the index megaspan passes."""
    from megaspan.models import backend

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: asked.append(index) or "H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: asked.append(index) or (9, 0))
    monkeypatch.setenv("LOCAL_RANK", "6")
    caps = backend.detect_capabilities()
    assert asked == [2, 2]
    assert caps.cuda and caps.compute_capability == (9, 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert backend.local_device_index() == 0

"""Size presets for ``megaspan bench``: config overrides plus warm-up/repeat defaults.

A preset is a list of dotted config overrides (the same syntax as ``megaspan train``) applied on
top of the schema defaults; the user's own overrides are applied after it. Synthetic data is
used, so ``model.vocab_size`` is always set (no tokenizer is trained or read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megaspan.errors import ConfigError

# Settings every preset shares: no dropout (its RNG cost is not what is being compared), a
# schedule without warm-up (lr 0 steps skip nothing, but keep the step honest), no validation.
_COMMON = (
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
    "schedule.warmup_steps=0",
    "schedule.decay_style=constant",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "training.exit_on_signal=false",
    "checkpoint.resume=none",
    "checkpoint.save_at_end=false",
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: tuple[str, ...]
    warmup: int = 2
    repeats: int = 5
    precision: str = "fp32"
    placements: tuple[str, ...] = field(default_factory=tuple)
    """Default placements; empty = every registered placement."""
    expert_parallel_from_world: bool = False
    """MoE presets: expert-parallel size = the number of processes (one expert group per GPU)."""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "cpu-small",
            "2 layers x 64, seq 64, 2 micro-batches: a smoke run, minutes on 2 cores",
            (
                "model.num_layers=2",
                "model.hidden_size=64",
                "model.num_attention_heads=4",
                "model.seq_length=64",
                "model.vocab_size=512",
                "training.micro_batch_size=2",
                "training.global_batch_size=4",
                "model.transformer_impl=local",
            ),
            warmup=1,
            repeats=3,
        ),
        Preset(
            "cpu",
            "12 layers x 256, seq 256, 2 micro-batches of 4: the CPU targets of issue 10",
            (
                "model.num_layers=12",
                "model.hidden_size=256",
                "model.num_attention_heads=4",
                "model.seq_length=256",
                "model.vocab_size=4096",
                "training.micro_batch_size=4",
                "training.global_batch_size=8",
                "model.transformer_impl=local",
            ),
            warmup=2,
            repeats=7,
        ),
        Preset(
            "h100-1b",
            "24 layers x 2048 (about 1.3B params), seq 4096, 8 micro-batches of 1, bf16",
            (
                "model.num_layers=24",
                "model.hidden_size=2048",
                "model.num_attention_heads=16",
                "model.seq_length=4096",
                "model.vocab_size=32000",
                "training.micro_batch_size=1",
                "training.global_batch_size=8",
            ),
            warmup=3,
            repeats=10,
            precision="bf16",
            placements=("pre", "spannorm"),
        ),
        Preset(
            "h100-moe",
            "12 layers x 2048, 8 experts top-2 (expert FFN 2048), seq 4096, EP = number of GPUs, bf16",
            (
                "model.num_layers=12",
                "model.hidden_size=2048",
                "model.num_attention_heads=16",
                "model.seq_length=4096",
                "model.vocab_size=32000",
                "model.moe.num_experts=8",
                "model.moe.router_topk=2",
                "model.moe.ffn_hidden_size=2048",
                "model.moe.grouped_gemm=true",
                "model.moe.token_dispatcher=alltoall",
                "training.micro_batch_size=1",
                "training.global_batch_size=8",
            ),
            warmup=3,
            repeats=10,
            precision="bf16",
            placements=("pre", "spannorm"),
            expert_parallel_from_world=True,
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown bench preset '{name}': use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def common_overrides() -> tuple[str, ...]:
    return _COMMON

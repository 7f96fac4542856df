"""A trained megaspan checkpoint as one in-process model: load, tokenize, score.

Every judging command (``generate``, ``eval``, ``export``) starts here. A checkpoint saved under
any TP/PP/EP/VPP layout (and with or without the distributed optimizer) is read into a model built
at TP1/PP1/EP1 in this one process: megaspan checkpoints are ``dist_checkpointing`` checkpoints
with layout-independent keys and padding (``models/mcore_config.padded_vocab_size``), so the
reshard is ``dist_checkpointing.load`` of the weights only, as ``checkpoint.load_optimizer=false``
does for training (tests/distributed/test_reshard.py shows it keeps the validation loss).

The config the model is built from is the one saved *inside* the checkpoint (its common state),
with the parallel layout reset to one process; the tokenizer is the one it was trained with (the
path recorded in that config, or ``tokenizer=`` when that file is gone) and must have the content
hash the checkpoint recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaspan.errors import CheckpointError, ConfigError

_ONE_PROCESS = {
    "tensor_model_parallel_size": 1,
    "sequence_parallel": False,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "context_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "use_distributed_optimizer": False,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from what the user names: a ``step_N`` checkpoint, a checkpoints
    directory (its newest valid one) or a run dir (``<run>/checkpoints``'s newest valid one)."""
    from megaspan.training.checkpoint import META_FILE, check_checkpoint, find_latest_valid

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} does not exist: name a run dir or a step_N checkpoint")
    if (path / META_FILE).exists():
        problem = check_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a complete megaspan checkpoint: {problem}")
        return path
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and (found := find_latest_valid(candidate)) is not None:
            return found
    raise CheckpointError(
        f"{path} is not a megaspan checkpoint (no {META_FILE}) and holds no valid step_* checkpoint: "
        "name a run dir, its checkpoints/ directory or one step_N checkpoint"
    )


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint belongs to (``<run>/checkpoints/step_N``), if it has one."""
    candidate = checkpoint.parent.parent
    return (
        candidate
        if checkpoint.parent.name == "checkpoints" and (candidate / "config.yaml").exists()
        else None
    )


def saved_config(checkpoint: Path) -> dict[str, Any]:
    """The config dict a checkpoint was saved with (its common, unsharded state)."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    except Exception as exc:  # any unreadable common state: say which checkpoint, in one line
        raise CheckpointError(f"{checkpoint}: cannot read its saved config ({type(exc).__name__})") from None
    config = common.get("config") if isinstance(common, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{checkpoint} holds no saved config: it was not written by megaspan train")
    return config


def config_for_one_process(config: dict[str, Any], dtype: str = "fp32"):
    """The saved config as a :class:`MegaspanConfig` for a TP1/PP1/EP1 model in this process."""
    from megaspan.config.loader import config_from_dict

    cfg = config_from_dict(config)
    if cfg.model.vocab_padding == "megatron":
        # Megatron's padding is a multiple of divisible_by x TP: keep the saving layout's padded
        # vocabulary (the checkpoint's embedding shape) at TP 1.
        cfg.model.make_vocab_size_divisible_by *= cfg.parallel.tensor_model_parallel_size
    for key, value in _ONE_PROCESS.items():
        setattr(cfg.parallel, key, value)
    # The model is built in fp32 and cast afterwards (see load_model); FP8 is a training format.
    cfg.precision = dataclasses.replace(cfg.precision, dtype="fp32", fp8=None)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    return cfg


@dataclass
class LoadedModel:
    """One TP1/PP1 model chunk in eval mode, its tokenizer and what it was loaded from."""

    cfg: Any  # MegaspanConfig
    model: torch.nn.Module
    tokenizer: Any  # megaspan.data.tokenizer.SentencePieceTokenizer
    checkpoint: Path
    device: torch.device
    step: int

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (ids at and above it are the embedding's padding rows)."""
        return self.tokenizer.vocab_size

    @property
    def max_length(self) -> int:
        """The longest context the model was trained on (and, for learned positions, can take)."""
        m = self.cfg.model
        return m.max_position_embeddings or m.seq_length

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 next-token logits ``[b, s, padded vocab]`` of a ``[b, s]`` batch of token ids (plain
        causal attention; positions 0..s-1, as in training).

        The padding rows are kept: training's loss is a softmax over the padded vocabulary, so
        scores (and perplexities) equal megaspan's validation loss only with them; sampling masks
        them (:func:`megaspan.evaluate.generate.next_token`)."""
        tokens = tokens.to(self.device)
        b, s = tokens.shape
        if s > self.max_length:
            raise ValueError(f"{s} tokens exceed the model's context of {self.max_length}")
        positions = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s)
        out = self.model(tokens, positions, None)
        return out.float()

    @torch.no_grad()
    def target_scores(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(targets[b, j] | tokens[b, :j + 1]), target is the greedy choice) per position of
        a ``[b, s]`` batch, on the CPU: :func:`megaspan.evaluate.scoring.target_scores` of
        :meth:`logits` (the in-loop hook computes the same from the live model's vocab shards)."""
        from megaspan.evaluate.scoring import target_scores

        logprobs, greedy = target_scores(self.logits(tokens), targets)
        return logprobs.cpu(), greedy.cpu()


def _recorded_tokenizer(cfg, checkpoint: Path) -> str | None:
    """The tokenizer file the run used: the checkpoint's config names it when the user set one;
    a run that trained its own records the resolved path in its run dir's config.yaml."""
    if cfg.tokenizer.model:
        return cfg.tokenizer.model
    run = run_dir_of(checkpoint)
    if run is not None:
        import yaml

        try:
            resolved = yaml.safe_load((run / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        return (resolved.get("tokenizer") or {}).get("model")
    return None


def _tokenizer(cfg, checkpoint: Path, meta: dict, override: str | None):
    from megaspan.data.tokenizer import build_tokenizer, load_tokenizer, tokenizer_hash

    saved = meta.get("tokenizer_hash")
    path = override or _recorded_tokenizer(cfg, checkpoint)
    if path and Path(path).exists():
        if saved and tokenizer_hash(path) != saved:
            raise CheckpointError(
                f"tokenizer mismatch: {path} is not the tokenizer {checkpoint} was trained with (content "
                f"hash {tokenizer_hash(path)[:12]}, the checkpoint's {saved[:12]}); pass --tokenizer PATH "
                "to that one"
            )
        return load_tokenizer(path)
    if override:
        raise CheckpointError(f"--tokenizer {override} does not exist")
    # The file is gone (a cleared cache): megaspan trains tokenizers deterministically from the
    # config and corpus, so the same config rebuilds the same model, which the hash confirms.
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
    if saved and tokenizer_hash(tokenizer.path) != saved:
        raise CheckpointError(
            f"{checkpoint} was trained with a tokenizer that is no longer at {path or 'its cache path'} and "
            "could not be rebuilt identically: pass --tokenizer PATH to the tokenizer.model it was trained with"
        )
    return tokenizer


def init_one_process(seed: int = 1234) -> None:
    """torch.distributed and Megatron's model-parallel state for one process (CPU emulation when
    there is no GPU); reused if this process already holds world-size-1 groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megaspan import runtime
    from megaspan.config.schema import ParallelConfig

    runtime.setup_cpu()
    if (
        dist.is_initialized()
        and dist.get_world_size() == 1
        and parallel_state.model_parallel_is_initialized()
    ):
        return
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError("load_model builds a one-process model; use the live model under a layout instead")
    runtime.init_process_group()
    runtime.initialize_model_parallel(ParallelConfig(), seed)


def load_model(
    path: str | Path, *, tokenizer: str | None = None, dtype: str = "fp32", device: str | None = None
) -> LoadedModel:
    """Load a checkpoint (a run dir, its checkpoints dir or a ``step_N``) into one process."""
    from megaspan.models import build_model
    from megaspan.training.checkpoint import load_model_weights, read_meta

    checkpoint = resolve_checkpoint(path)
    meta = read_meta(checkpoint) or {}
    config = saved_config(checkpoint)
    cfg = config_for_one_process(config, dtype)
    tok = _tokenizer(cfg, checkpoint, meta, tokenizer)
    init_one_process(cfg.training.seed)
    built = build_model(cfg, cfg.model.vocab_size or tok.vocab_size, init_rules=False)
    (chunk,) = built.chunks
    load_model_weights(checkpoint, [chunk])  # weights only, any saved layout, one-line errors
    from megaspan import runtime

    target = torch.device(device) if device else runtime.device()
    chunk.to(device=target, dtype=DTYPES[dtype]).eval()
    return LoadedModel(cfg, chunk, tok, checkpoint, target, int(meta.get("step", 0)))

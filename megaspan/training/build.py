"""Assemble a :class:`Trainer` from a config: ``build_trainer`` (reusable, tests use it) and
``train`` (the ``megaspan train`` job: process group, build, fit, tear down).

Order of work in :func:`build_trainer`, and why:

1. Megatron parallel state and seeds; tokenizer and datasets (unless given). Everything that can
   fail because of bad user input (data paths, tokenizer, resume target, backend) fails here,
   before the run dir is touched;
2. run dir and ``config.yaml``;
3. model (DDP), optimizer, scheduler; restore a checkpoint if resuming;
4. the hooks: the built-in ones from the config, then the caller's.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megaspan import runtime
from megaspan.config import derived
from megaspan.config.layout import ParallelLayout
from megaspan.config.loader import config_to_dict, norm_options
from megaspan.config.schema import MegaspanConfig
from megaspan.errors import CheckpointError, ConfigError, RunDirError, UserError
from megaspan.training.callbacks.checkpointing import CheckpointHook
from megaspan.training.callbacks.downstream import DownstreamHook
from megaspan.training.callbacks.evaluation import EvalHook
from megaspan.training.callbacks.guard import GuardHook
from megaspan.training.callbacks.metrics_log import LogHook
from megaspan.training.callbacks.preemption import PreemptionHook
from megaspan.training.callbacks.summary import SummaryHook
from megaspan.training.checkpoint import check_checkpoint, find_latest_valid, remove_stale_tmp
from megaspan.training.hooks import Hook
from megaspan.training.metrics import MetricsLogger, flops_per_token
from megaspan.training.rundir import RunDirLock, completed_run, guarded, write_resolved_config
from megaspan.training.setup import TrainingObjects, build_training_objects
from megaspan.training.signals import PreemptionFlag
from megaspan.training.trainer import RankPosition, Trainer, checkpoint_dir, run_dir
from megaspan.training.wandb_log import check as check_wandb

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_resume(cfg: MegaspanConfig) -> Path | None:
    """The checkpoint to resume from: 'none', 'auto' (latest valid, if any), or a path."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        # Checksums too: a corrupt newest checkpoint is skipped with one warning line; if
        # checkpoints exist and none is intact, stop (never a silent restart from scratch).
        return find_latest_valid(checkpoint_dir(cfg), verify=True, require_intact=True)
    path = Path(resume)
    # Checksums too (an explicit target is read once anyway), and the one line names the file
    # that is wrong, not just "incomplete".
    problem = check_checkpoint(path, verify=True)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint.resume={resume}: {problem}; point it at a complete step_NNNNNNN checkpoint "
            "directory or use checkpoint.resume=auto"
        )
    return path


def resolved_deterministic(cfg: MegaspanConfig) -> bool:
    """``training.deterministic`` on this machine (None = on for CPU, off on GPU)."""
    return derived.deterministic(cfg, torch.cuda.is_available())


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs; warn_only because a few
        # CUDA kernels (e.g. embedding backward) have no deterministic variant.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty with NaN/max: a debugging aid that
        # changes no result of correct code, and costs a memset per allocation on GPU.
        torch.utils.deterministic.fill_uninitialized_memory = False
    else:
        torch.use_deterministic_algorithms(False)


def rank_position(cfg: MegaspanConfig) -> RankPosition:
    from megatron.core import parallel_state as ps

    layout = ParallelLayout.of(cfg, dist.get_world_size())
    if layout.dp != ps.get_data_parallel_world_size():  # the one dp arithmetic must be Megatron's
        raise RuntimeError(f"layout dp {layout.dp} != Megatron's {ps.get_data_parallel_world_size()}")
    return RankPosition(
        layout=layout,
        dp_rank=ps.get_data_parallel_rank(),
        # Every CP rank holds a different part of each sequence (its own token loss sum and
        # count), so all of them report: the all-reduced sums give the exact per-token mean.
        reports_loss=ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0,
    )


def init_megatron(cfg: MegaspanConfig) -> RankPosition:
    """The process-wide Megatron-Core state a model needs before it is built and stepped: seeds,
    model-parallel groups (re-initializing also resets Megatron's process-wide MoE state, see
    ``megaspan.runtime``) and the number-of-microbatches calculator. Also ``megaspan bench``'s."""
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    seed_everything(cfg.training.seed, resolved_deterministic(cfg))
    runtime.initialize_model_parallel(cfg.parallel, cfg.training.seed)
    position = rank_position(cfg)
    destroy_num_microbatches_calculator()  # a process may build several trainers (tests)
    init_num_microbatches_calculator(
        dist.get_rank(), None, cfg.training.global_batch_size, cfg.training.micro_batch_size, position.dp_size
    )
    return position


def _sample_counts(cfg: MegaspanConfig) -> tuple[int, int, int]:
    """Samples each split must provide: all training steps, one validation pass, no test."""
    tr = cfg.training
    steps = tr.steps
    if tr.guard.policy == "rollback":
        # Each rollback skips the data window since the last checkpoint: at most save_interval steps.
        steps += tr.guard.max_retries * (cfg.checkpoint.save_interval or tr.steps)
    return (steps * tr.global_batch_size, tr.eval_steps * tr.global_batch_size, 0)


@dataclass(frozen=True)
class Data:
    vocab_size: int
    datasets: tuple  # (train, valid, test) map-style datasets of GPTDataset samples
    tokenizer_path: str | None = None
    tokenizer_hash: str | None = None  # content hash: recorded in config.yaml and every checkpoint
    identity: dict | None = None  # prefixes, sizes, .idx hashes, blend: recorded in every checkpoint
    valid_sets: dict = dataclasses.field(default_factory=dict)  # data.valid_sets: {name: dataset}
    prefixes: dict[str, list[str]] | None = None
    """The .bin/.idx prefixes each split reads ({"train": [...], "valid": [...]}), recorded in
    config.yaml and summary.json so that a report can read the real training data (its unigram
    entropy is what a collapsed run's loss sits at)."""


def dataset_prefixes(datasets) -> dict[str, list[str]]:
    """{split: [path prefix, ...]} of Megatron (blended) datasets; splits without data left out."""
    out: dict[str, list[str]] = {}
    for name, ds in zip(("train", "valid", "test"), datasets):
        parts = getattr(ds, "datasets", None) or ([ds] if ds is not None else [])
        paths = [str(p.dataset_path) for p in parts if getattr(p, "dataset_path", None)]
        if paths:
            out[name] = sorted(set(paths))
    return out


def build_data(cfg: MegaspanConfig) -> Data:
    """Tokenizer and datasets on every rank; rank 0 builds caches first."""
    from megaspan.data.datasets import build_datasets, build_valid_sets, dataset_identity
    from megaspan.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); leave it null to use the tokenizer's"
        )
    datasets = build_datasets(
        cfg.data,
        tokenizer,
        cfg.model.seq_length,
        cfg.training.seed,
        _sample_counts(cfg),
        # The model only needs a mask when documents are masked from each other; otherwise
        # attention is plainly causal and a [s, s] mask per sample is wasted memory.
        create_attention_mask=cfg.data.reset_attention_mask,
    )
    identity = dataset_identity(cfg.data, tokenizer)
    valid_sets = build_valid_sets(
        cfg.data,
        tokenizer,
        cfg.model.seq_length,
        cfg.training.seed,
        _sample_counts(cfg)[1],
        create_attention_mask=cfg.data.reset_attention_mask,
    )
    return Data(
        vocab,
        datasets,
        str(tokenizer.path),
        tokenizer.sha256,
        identity,
        valid_sets,
        dataset_prefixes(datasets),
    )


def _on_rank0[T](action: Callable[[], T], *, everywhere: bool = False) -> T | None:
    """Run ``action`` on rank 0 (``everywhere``: on every rank); a UserError on rank 0 is raised
    on every rank, so no rank is left waiting in a collective for one that gave up."""
    result, error = None, None
    if everywhere or dist.get_rank() == 0:
        try:
            result = action()
        except UserError as exc:
            error = exc
    if dist.get_world_size() > 1:
        box = [None if error is None else (type(error), str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            error = box[0][0](box[0][1])
    if error is not None:
        raise error
    return result


def _open_run_dir(cfg: MegaspanConfig) -> RunDirLock | None:
    """Rank 0 creates the run dir and locks it against a second live run."""

    def open_() -> RunDirLock:
        path = run_dir(cfg)
        guarded(path, lambda: path.mkdir(parents=True, exist_ok=True))
        lock = RunDirLock(path)
        lock.acquire()
        return lock

    return _on_rank0(open_)


def resolved_config(cfg: MegaspanConfig, trainer: Trainer, data: Data) -> tuple[dict, dict]:
    """(config dict with the run's resolved values, what else the run was made of)."""
    import megatron.core

    import megaspan

    config = config_to_dict(cfg)
    config["precision"]["dtype"] = _DTYPE_NAMES.get(
        trainer.objs.config.params_dtype, config["precision"]["dtype"]
    )
    config["model"]["vocab_size"] = data.vocab_size
    config["training"]["deterministic"] = resolved_deterministic(cfg)
    # The other values the run derives from a null (a trial found config.yaml with these left
    # null, so it did not say what the run used): the same functions the model build calls.
    from megaspan.norms.registry import build_placement

    m = cfg.model
    placement = build_placement(m.norm_placement, norm_options(cfg), m.num_layers)
    model = config["model"]
    model["num_query_groups"] = m.num_query_groups or m.num_attention_heads
    model["ffn_hidden_size"] = derived.ffn_hidden_size(m)
    model["max_position_embeddings"] = m.max_position_embeddings or m.seq_length
    model["init_method_std"] = placement.init_std(m.hidden_size, m.init_method_std)
    if isinstance(model.get("norm"), dict):
        model["norm"]["final_norm"] = placement.final_norm
    config["schedule"]["decay_steps"] = derived.decay_steps(cfg)
    if data.tokenizer_path is not None:
        config["tokenizer"]["model"] = data.tokenizer_path
    p = trainer.position
    extra = {
        "tokenizer_hash": data.tokenizer_hash,
        "world": dataclasses.asdict(p.layout),
        "data": data.prefixes if data.prefixes is not None else dataset_prefixes(data.datasets),
        "versions": {
            "megaspan": megaspan.__version__,
            "torch": torch.__version__,
            "megatron-core": megatron.core.__version__,
        },
    }
    return config, extra


def _total_params(objs: TrainingObjects) -> int:
    """Parameters summed over the model-parallel group (for the MFU estimate)."""
    from megatron.core import parallel_state as ps

    count = torch.tensor([objs.num_params], dtype=torch.float64, device=runtime.device())
    if dist.get_world_size() > 1:
        dist.all_reduce(count, group=ps.get_model_parallel_group())
    return int(count.item())


def _restore(trainer: Trainer, resume: Path | None) -> None:
    """Load the checkpoint to start from (nothing for a fresh run); log changed hyper-parameters."""
    cfg = trainer.cfg
    if resume is None:
        return
    # A weights-only start (fine-tuning) happens once: a restarted run (Slurm requeue) continues
    # from its own latest checkpoint with its full state instead of starting over.
    own = None if cfg.checkpoint.load_optimizer else find_latest_valid(checkpoint_dir(cfg))
    weights_only = not cfg.checkpoint.load_optimizer and own is None
    path = own or resume
    progress = trainer.load(path, load_optimizer=not weights_only)
    if weights_only:
        trainer.log.info(f"loaded model weights from {path}; optimizer, schedule and step start fresh")
    else:
        trainer.log.info(f"resumed from checkpoint at step {progress.step} ({path})")
    for key, (before, now) in sorted(getattr(progress, "changed", {}).items()):
        trainer.log.info(
            f"resume: {key} changed {before} -> {now}; the new value applies from step {progress.step + 1}"
        )


def default_hooks(cfg: MegaspanConfig, preempt: PreemptionFlag | None) -> list[Hook]:
    """The built-in hooks the config asks for, in the order they run: the guard first (it decides
    before anything logs or saves the step), the summary last (it sees every stop)."""
    from megaspan.training.diagnostics import DiagnosticsHook

    hooks: list[Hook] = []
    if cfg.training.guard.policy:
        hooks.append(GuardHook(cfg.training.guard, checkpoint_dir(cfg)))
    if cfg.logging.diagnostics_interval:
        hooks.append(DiagnosticsHook(cfg.logging.diagnostics_interval))
    hooks += [
        LogHook(cfg.logging.log_interval, cfg.training.steps),
        EvalHook(cfg.training.eval_interval),
    ]
    if cfg.eval.downstream.tasks:
        hooks.append(DownstreamHook(cfg.eval.downstream))  # checks the task names (one line, exit 2)
    hooks.append(CheckpointHook(cfg.checkpoint.save_interval, cfg.checkpoint.save_at_end))
    if preempt is not None:
        hooks.append(PreemptionHook(preempt, run_dir(cfg)))
    hooks.append(SummaryHook(run_dir(cfg), cfg.training.guard))
    return hooks


def build_trainer(
    cfg: MegaspanConfig,
    *,
    hooks: Sequence[Hook] = (),
    datasets=None,
    vocab_size: int | None = None,
    preempt: PreemptionFlag | None = None,
) -> Trainer:
    """A ready-to-``fit`` trainer on this rank (the process group must exist). Collective.

    ``datasets`` = ``(train, valid, ...)`` map-style datasets of GPTDataset samples replaces the
    tokenizer and corpus (then ``vocab_size`` is required); ``hooks`` run after the built-in ones;
    ``preempt`` (a :class:`PreemptionFlag`) enables the stop-on-signal hook. Call
    :meth:`Trainer.close` when done (logs, run-dir lock).
    """
    from megaspan.models import allow_fp8_extra_state, resolve_impl

    allow_fp8_extra_state(cfg)  # before any checkpoint is read: FP8-delayed resumes need it
    position = init_megatron(cfg)
    # No wandb package / no network for an online run: one line now, before data is prepared.
    _on_rank0(lambda: check_wandb(cfg.logging.wandb))
    if datasets is None:
        data = build_data(cfg)
    elif vocab_size is None:
        raise ValueError("build_trainer(datasets=...) needs vocab_size")
    else:
        data = Data(vocab_size, tuple(datasets))
    resume = resolve_resume(cfg)
    resolve_impl(cfg.model.transformer_impl)  # BackendError now, not after the run dir exists
    all_hooks = default_hooks(cfg, preempt) + list(hooks)  # their config errors too
    lock = _open_run_dir(cfg)
    log = None
    try:
        objs = build_training_objects(cfg, data.vocab_size)
        total_params = _total_params(objs)
        log = _on_rank0(lambda: _logger(cfg, objs, total_params), everywhere=True)
        trainer = Trainer(
            cfg,
            objs,
            data.datasets,
            position,
            log,
            all_hooks,
            preempt=preempt,
            tokenizer_hash=data.tokenizer_hash,
            data_identity=data.identity,
            run_dir_lock=lock,
        )
        trainer.valid_sets = dict(data.valid_sets)
        _log_header(trainer, data, total_params)
        _restore(trainer, resume)
        # Only now, with every check passed: a failed start leaves the previous config.yaml.
        log.start_tensorboard(purge_after=trainer.progress.step if resume is not None else None)
        config, extra = resolved_config(cfg, trainer, data)
        _on_rank0(lambda: write_resolved_config(run_dir(cfg), config, extra))
        _on_rank0(lambda: log.start_wandb(cfg.logging.wandb, {**config, **extra}, resumed=resume is not None))
        trainer.resolved = {"config": config, **extra}
        if dist.get_rank() == 0:
            remove_stale_tmp(checkpoint_dir(cfg), log.info)
        return trainer
    except BaseException:
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()
        raise


def _logger(cfg: MegaspanConfig, objs: TrainingObjects, total_params: int) -> MetricsLogger:
    m = cfg.model
    return MetricsLogger(
        enabled=dist.get_rank() == 0,
        total_steps=cfg.training.steps,
        run_dir=run_dir(cfg),
        tensorboard=cfg.logging.tensorboard,
        progress_bar=cfg.logging.progress_bar,
        flops_per_token=flops_per_token(total_params, m.num_layers, m.hidden_size, m.seq_length),
    )


def _log_header(trainer: Trainer, data: Data, total_params: int) -> None:
    m, p = trainer.cfg.model, trainer.position
    trainer.log.info(
        f"megaspan train: {m.norm_placement} GPT, {m.num_layers} layers x {m.hidden_size}, "
        f"{total_params / 1e6:.2f}M params, vocab {data.vocab_size}, world {dist.get_world_size()} "
        f"(dp {p.dp_size}), {p.num_microbatches} micro-batches/step, "
        f"dtype {trainer.objs.config.params_dtype}, run dir {run_dir(trainer.cfg)}"
    )


def train(cfg: MegaspanConfig, *, exiting: bool = False) -> int:
    """Run (or resume) the training job described by ``cfg``; returns the exit code.

    ``exiting``: the process ends right after (the ``megaspan`` command): the signal handlers are
    not restored but :meth:`PreemptionFlag.finish`-ed, so a SIGTERM during teardown cannot
    replace the run's exit code with -15."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    done = completed_run(run_dir(cfg), config_to_dict(cfg)) if cfg.checkpoint.resume == "auto" else None
    if done is not None:
        step, differ = done
        if differ:
            raise RunDirError(
                f"training.run_dir={cfg.training.run_dir} holds a run completed at step {step} with other "
                f"settings ({'; '.join(differ)}): use another training.run_dir, or raise training.steps "
                "to train it further"
            )
        if runtime.env_from_launcher().rank == 0:
            print(
                f"megaspan: {cfg.training.run_dir} is already complete at step {step}: nothing to do "
                "(raise training.steps to train it further)",
                flush=True,
            )
        return 0
    # Installed first: Slurm's SIGUSR1 warning may arrive during start-up, and its default
    # action would kill the job; a flag raised before the loop stops it after its first step.
    preempt = PreemptionFlag() if cfg.training.exit_on_signal else None
    if preempt is not None:
        preempt.install()
    # Tear down only what this call creates: an embedding process (tests, notebooks, a sweep
    # worker) may own the world group and keep using it after train() returns.
    owns_world = not dist.is_initialized()
    runtime.init_process_group()
    try:
        trainer = build_trainer(cfg, preempt=preempt)
        try:
            code = trainer.fit()
            if trainer.finished:
                trainer.log.info(f"training finished at step {trainer.progress.step}")
            if dist.get_world_size() > 1:
                # Ranks leave together after a clean end, so none tears down its gloo pairs (or,
                # on rank 0, the rendezvous store) while a peer is still in its last collective:
                # a 2-rank srun job once aborted in teardown ("terminate called without an active
                # exception") after a clean finish. Not on error paths, where a peer may never
                # arrive and the barrier would turn a crash into a hang.
                dist.barrier()
            return code
        except RunDirError as exc:
            # The filesystem refused a write mid-run (full disk, permissions): one line, exit 1;
            # the checkpoints written before are intact.
            trainer.log.error(f"megaspan: error: {exc}")
            return 1
        finally:
            trainer.close()
    finally:
        if exiting and preempt is not None:
            preempt.finish()
        if not exiting:
            # An exiting process skips this: the groups die with it (megaspan.cli.exit_now), and
            # the teardown (a full gc pass over the model graph) was half a second after the last
            # line. The barrier above already let every peer finish its last collective.
            destroy_num_microbatches_calculator()
            if owns_world:
                runtime.destroy()
            else:
                runtime.destroy_model_parallel()
        if preempt is not None and not exiting:
            preempt.restore()

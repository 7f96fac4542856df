"""``megaspan train``: the training loop on Megatron-Core.

Order of work, and why:

1. process groups, seeds, tokenizer and datasets. Everything that can fail because of bad user
   input (data paths, tokenizer, resume target) fails here, before the run dir is touched;
2. run dir, resolved ``config.yaml``, logs;
3. model (DDP), optimizer, scheduler; restore a checkpoint if resuming;
4. steps through ``get_forward_backward_func`` (micro-batches, gradient accumulation and
   pipeline/virtual-pipeline schedules all live there); validation, checkpoints and the
   preemption check at step boundaries.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megaspan import runtime
from megaspan.config.loader import ConfigError, config_to_dict, dump_config
from megaspan.config.schema import MegaspanConfig
from megaspan.models.backend import resolve_impl
from megaspan.training.batches import Batch, micro_batches
from megaspan.training.checkpoint import (
    Progress,
    find_latest_valid,
    is_valid,
    load_checkpoint,
    save_checkpoint,
)
from megaspan.training.diagnostics import LayerDiagnostics
from megaspan.training.metrics import MetricsLogger, StepStats, flops_per_token
from megaspan.training.setup import TrainingObjects, build_training_objects, cuda_free
from megaspan.training.signals import PreemptionFlag

PREEMPTED_MARKER = "preempted"


@dataclass
class Layout:
    """This rank's place in the data-parallel and pipeline layout."""

    dp_rank: int
    dp_size: int
    num_microbatches: int
    reports_loss: bool  # one rank per data-parallel replica contributes to the logged loss


def run_dir(cfg: MegaspanConfig) -> Path:
    return Path(cfg.training.run_dir)


def checkpoint_dir(cfg: MegaspanConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def resolve_resume(cfg: MegaspanConfig) -> Path | None:
    """The checkpoint to resume from: 'none', 'auto' (latest valid, if any), or a path."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest_valid(checkpoint_dir(cfg))
    path = Path(resume)
    if not is_valid(path):
        raise ConfigError(f"checkpoint.resume={resume}: not a complete megaspan checkpoint directory")
    return path


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs; warn_only because a few
        # CUDA kernels (e.g. embedding backward) have no deterministic variant.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def _layout(cfg: MegaspanConfig) -> Layout:
    from megatron.core import parallel_state as ps

    dp_size = ps.get_data_parallel_world_size()
    tr = cfg.training
    return Layout(
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=dp_size,
        num_microbatches=tr.global_batch_size // (tr.micro_batch_size * dp_size),
        reports_loss=(
            ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0
        ),
    )


def _sample_counts(cfg: MegaspanConfig) -> tuple[int, int, int]:
    """Samples each split must provide: all training steps, one validation pass, no test."""
    tr = cfg.training
    return (tr.steps * tr.global_batch_size, tr.eval_steps * tr.global_batch_size, 0)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token loss, as pretrain_gpt.loss_func: (sum, token count, {name: [sum, count]}).

    The schedule divides the sum by the count and by the number of micro-batches, so the
    gradient is that of the per-micro-batch masked mean; the reported pair lets the logger
    compute the exact token-weighted mean over micro-batches and data-parallel ranks.
    """
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(use_attention_mask: bool, data_iterator: Iterator[Batch], model):
    """One micro-batch through one model chunk (Megatron's forward_step_func contract)."""
    batch = next(data_iterator)
    # GPTDataset's mask is the plain causal one unless documents are masked from each other;
    # passing None lets attention use its causal kernel.
    mask = batch.get("attention_mask") if use_attention_mask else None
    output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _reduce_reported(losses: list[dict], layout: Layout, device: torch.device) -> tuple[float, float]:
    """(loss sum, token count) over all micro-batches and data-parallel replicas."""
    total = torch.zeros(2, dtype=torch.float32, device=device)
    if layout.reports_loss and losses:
        total += torch.vstack([x["lm loss"].view(-1) for x in losses]).sum(dim=0)
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total[0]), float(total[1])


class Trainer:
    def __init__(
        self,
        cfg: MegaspanConfig,
        objs: TrainingObjects,
        datasets,
        layout: Layout,
        log: MetricsLogger,
        preempt: PreemptionFlag,
    ):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg = cfg
        self.objs = objs
        self.train_ds, self.valid_ds = datasets[0], datasets[1]
        self.layout = layout
        self.log = log
        self.device = runtime.device()
        self.fwd_bwd = get_forward_backward_func()
        self.step_fn = partial(forward_step, cfg.data.reset_attention_mask)
        self.preempt = preempt
        self.diagnostics = LayerDiagnostics(
            objs.chunks, cfg.model.num_layers, cfg.logging.diagnostics_interval
        )

    # -- data ------------------------------------------------------------------------------

    def _iterators(self, dataset, consumed_samples: int) -> list[Iterator[Batch]]:
        """One iterator per model chunk: each virtual stage reads the same micro-batches."""
        return [
            micro_batches(
                dataset, consumed_samples, self.cfg.training.micro_batch_size,
                self.layout.dp_rank, self.layout.dp_size, self.device,
            )
            for _ in self.objs.model
        ]

    def _run_schedule(self, iterators, forward_only: bool) -> list[dict]:
        return self.fwd_bwd(
            forward_step_func=self.step_fn,
            data_iterator=iterators,
            model=self.objs.model,
            num_microbatches=self.layout.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )

    # -- steps -----------------------------------------------------------------------------

    def train_step(self, iterators, step: int) -> tuple[float, float | None]:
        """Optimizer step number ``step`` over a global batch: returns (loss, grad norm)."""
        objs = self.objs
        for chunk in objs.model:
            chunk.zero_grad_buffer()
        objs.optimizer.zero_grad()
        diagnose = self.diagnostics.arm(step)
        losses = self._run_schedule(iterators, forward_only=False)
        if diagnose:  # before the optimizer step, which clips the gradients in place
            self.log.scalars(self.diagnostics.collect(self.device), step)
        # The scheduler is stepped first so that update k uses lr(k): with warmup, Megatron's
        # optimizer-then-scheduler order spends the first update on lr = 0.
        objs.scheduler.step(increment=1)
        with cuda_free():
            _, grad_norm, _ = objs.optimizer.step()
        loss_sum, tokens = _reduce_reported(losses, self.layout, self.device)
        return loss_sum / max(tokens, 1.0), grad_norm

    def evaluate(self) -> float:
        """Mean validation loss over the first ``eval_steps`` global batches (same ones each time,
        so the curve is comparable across evaluations)."""
        for chunk in self.objs.model:
            chunk.eval()
        iterators = self._iterators(self.valid_ds, 0)
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for _ in range(self.cfg.training.eval_steps):
                s, t = _reduce_reported(self._run_schedule(iterators, True), self.layout, self.device)
                loss_sum, tokens = loss_sum + s, tokens + t
        for chunk in self.objs.model:
            chunk.train()
        return loss_sum / max(tokens, 1.0)

    def save(self, progress: Progress) -> Path:
        cfg = self.cfg
        with cuda_free():
            path = save_checkpoint(
                checkpoint_dir(cfg), progress, self.objs.chunks, self.objs.optimizer,
                self.objs.scheduler, config_to_dict(cfg), cfg.checkpoint.keep_last,
            )
        self.log.info(f"saved checkpoint {path}")
        return path

    # -- loop ------------------------------------------------------------------------------

    def run(self, progress: Progress) -> int:
        cfg, tr = self.cfg, self.cfg.training
        if progress.step == 0:
            self.log.validation(0, self.evaluate())
        iterators = self._iterators(self.train_ds, progress.consumed_samples)
        window_losses: list[float] = []
        step_times: list[float] = []
        last_saved = last_eval = progress.step
        while progress.step < tr.steps:
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step(iterators, progress.step + 1)
            progress = Progress(progress.step + 1, progress.consumed_samples + tr.global_batch_size)
            step_times.append(time.perf_counter() - t0)
            window_losses.append(loss)
            step = progress.step
            if step % cfg.logging.log_interval == 0 or step == tr.steps:
                self._log_window(step, window_losses, step_times, grad_norm)
                window_losses = []
            if step % tr.eval_interval == 0:
                self.log.validation(step, self.evaluate())
                last_eval = step
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                self.save(progress)
                last_saved = step
            if self.preempt.agreed(self.device):
                if last_saved != step:
                    self.save(progress)
                self._mark_preempted(step)
                return 0
        if last_eval != progress.step:
            self.log.validation(progress.step, self.evaluate())
        if cfg.checkpoint.save_at_end and last_saved != progress.step:
            self.save(progress)
        self.log.info(f"training finished at step {progress.step}")
        return 0

    def _log_window(
        self, step: int, losses: list[float], step_times: list[float], grad_norm: float | None
    ) -> None:
        """Log the mean loss of the steps since the last log line."""
        tokens_per_step = self.cfg.training.global_batch_size * self.cfg.model.seq_length
        # Step time only: validation and checkpoint time would understate throughput.
        elapsed = sum(step_times[-len(losses):])
        # The first step of a process pays one-off costs; leave it out of the ETA.
        recent = (step_times[1:] or step_times)[-20:]
        self.log.train_step(
            StepStats(
                step=step,
                loss=sum(losses) / len(losses),
                lr=self.objs.scheduler.get_lr(self.objs.optimizer.param_groups[0]),
                grad_norm=grad_norm,
                tokens_per_s=tokens_per_step * len(losses) / max(elapsed, 1e-9),
                loss_scale=self._loss_scale(),
            ),
            seconds_per_step=sum(recent) / len(recent),
        )

    def _loss_scale(self) -> float | None:
        if not self.objs.config.fp16:
            return None
        return float(self.objs.optimizer.get_loss_scale())

    def _mark_preempted(self, step: int) -> None:
        import signal

        name = signal.Signals(self.preempt.signum).name if self.preempt.signum else "peer"
        self.log.info(f"stopping on {name} at step {step}: checkpoint saved, exiting 0")
        if dist.get_rank() == 0:
            (run_dir(self.cfg) / PREEMPTED_MARKER).write_text(f"step {step} signal {name}\n")


def _prepare_run_dir(cfg: MegaspanConfig) -> None:
    """Rank 0 creates the run dir and writes the resolved config; others wait."""
    if dist.get_rank() == 0:
        run_dir(cfg).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir(cfg) / "config.yaml")
    dist.barrier()


def _total_params(objs: TrainingObjects) -> int:
    """Parameters summed over the model-parallel group (for the MFU estimate)."""
    from megatron.core import parallel_state as ps

    count = torch.tensor([objs.num_params], dtype=torch.float64, device=runtime.device())
    if dist.get_world_size() > 1:
        dist.all_reduce(count, group=ps.get_model_parallel_group())
    return int(count.item())


def _restore(cfg: MegaspanConfig, resume: Path | None, objs: TrainingObjects, log: MetricsLogger) -> Progress:
    """Load the checkpoint to start from; Progress(0, 0) for a fresh run."""
    if resume is None:
        return Progress(0, 0)
    # A weights-only start (fine-tuning) happens once: a restarted run (Slurm requeue) continues
    # from its own latest checkpoint with its full state instead of starting over.
    own = None if cfg.checkpoint.load_optimizer else find_latest_valid(checkpoint_dir(cfg))
    weights_only = not cfg.checkpoint.load_optimizer and own is None
    path = own or resume
    with cuda_free():
        progress = load_checkpoint(
            path, objs.chunks, objs.optimizer, objs.scheduler, load_optimizer=not weights_only
        )
    if weights_only:
        log.info(f"loaded model weights from {path}; optimizer, schedule and step start fresh")
    else:
        log.info(f"resumed from checkpoint at step {progress.step} ({path})")
    return progress


def _build_data(cfg: MegaspanConfig):
    """(vocab size, (train, valid, test)) on every rank; rank 0 builds caches first."""
    from megaspan.data.datasets import build_datasets
    from megaspan.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); leave it null to use the tokenizer's"
        )
    datasets = build_datasets(
        cfg.data, tokenizer, cfg.model.seq_length, cfg.training.seed, _sample_counts(cfg),
        # The model only needs a mask when documents are masked from each other; otherwise
        # attention is plainly causal and a [s, s] mask per sample is wasted memory.
        create_attention_mask=cfg.data.reset_attention_mask,
    )
    return vocab, datasets


def train(cfg: MegaspanConfig) -> int:
    """Run (or resume) the training job described by ``cfg``; returns the exit code."""
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    # Installed first: Slurm's SIGUSR1 warning may arrive during start-up, and its default
    # action would kill the job; a flag raised before the loop stops it after its first step.
    preempt = PreemptionFlag()
    if cfg.training.exit_on_signal:
        preempt.install()
    runtime.init_process_group()
    try:
        _seed_everything(cfg.training.seed, cfg.training.deterministic)
        runtime.initialize_model_parallel(cfg.parallel, cfg.training.seed)
        layout = _layout(cfg)
        init_num_microbatches_calculator(
            dist.get_rank(), None, cfg.training.global_batch_size,
            cfg.training.micro_batch_size, layout.dp_size,
        )
        vocab, datasets = _build_data(cfg)
        resume = resolve_resume(cfg)
        resolve_impl(cfg.model.transformer_impl)  # BackendError now, not after the run dir exists
        _prepare_run_dir(cfg)
        objs = build_training_objects(cfg, vocab)
        m = cfg.model
        total_params = _total_params(objs)
        log = MetricsLogger(
            enabled=dist.get_rank() == 0,
            total_steps=cfg.training.steps,
            run_dir=run_dir(cfg),
            tensorboard=cfg.logging.tensorboard,
            progress_bar=cfg.logging.progress_bar,
            flops_per_token=flops_per_token(total_params, m.num_layers, m.hidden_size, m.seq_length),
        )
        try:
            log.info(
                f"megaspan train: {m.norm_placement} GPT, {m.num_layers} layers x {m.hidden_size}, "
                f"{total_params / 1e6:.2f}M params, vocab {vocab}, world {dist.get_world_size()} "
                f"(dp {layout.dp_size}), {layout.num_microbatches} micro-batches/step, "
                f"dtype {objs.config.params_dtype}, run dir {run_dir(cfg)}"
            )
            progress = _restore(cfg, resume, objs, log)
            return Trainer(cfg, objs, datasets, layout, log, preempt).run(progress)
        finally:
            log.close()
    finally:
        destroy_num_microbatches_calculator()
        runtime.destroy()
        preempt.restore()

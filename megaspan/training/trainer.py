"""The training loop on Megatron-Core: ``Trainer.fit`` is the step loop plus hook calls.

One step (:meth:`Trainer.train_step`): zero the gradient buffers, run the micro-batches through
``get_forward_backward_func`` (gradient accumulation and pipeline/virtual-pipeline schedules
all live there), one all-reduce of ``[loss sum, tokens, signalled]``, hooks'
``before_optimizer_step``, scheduler and optimizer step. Everything periodic is a hook
(:mod:`megaspan.training.hooks`); the trainer is built by :func:`megaspan.training.build.build_trainer`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megaspan import runtime
from megaspan.config.layout import ParallelLayout
from megaspan.config.loader import config_to_dict
from megaspan.config.schema import MegaspanConfig
from megaspan.training.batches import Batch, micro_batches
from megaspan.training.checkpoint import (
    PendingSave,
    Progress,
    finish_save,
    load_checkpoint,
    new_lineage,
    save_checkpoint,
    save_done,
)
from megaspan.training.hooks import Hook, Reduced, StepResult, StopRequest, call
from megaspan.training.metrics import MetricsLogger
from megaspan.training.setup import TrainingObjects, cuda_free
from megaspan.training.zloss import ZLoss


@dataclass(frozen=True)
class RankPosition:
    """This rank's place in the run's :class:`~megaspan.config.ParallelLayout`."""

    layout: ParallelLayout
    dp_rank: int
    reports_loss: bool  # one rank per data-parallel replica and CP part contributes to the logged loss

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def num_microbatches(self) -> int:
        return self.layout.num_microbatches


def run_dir(cfg: MegaspanConfig) -> Path:
    return Path(cfg.training.run_dir)


def checkpoint_dir(cfg: MegaspanConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, z_loss: ZLoss | None = None):
    """Masked token loss, as pretrain_gpt.loss_func: (sum, token count, {name: [sum, count]}).

    With ``z_loss`` (``training.z_loss`` > 0) each token's loss gains coeff x log(Z)^2 before the
    mask; the reported pair stays the cross entropy's.

    The schedule divides the sum by the count and by the number of micro-batches, so the
    gradient is that of the per-micro-batch masked mean; the reported pair lets the logger
    compute the exact token-weighted mean over micro-batches and data-parallel ranks.
    """
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    if z_loss is not None:
        loss = loss + torch.sum(z_loss.per_token().reshape(-1) * mask)
    return loss, num_tokens, {"lm loss": report}


def forward_step(
    use_attention_mask: bool, data_iterator: Iterator[Batch], model, z_loss: ZLoss | None = None
):
    """One micro-batch through one model chunk (Megatron's forward_step_func contract)."""
    batch = next(data_iterator)
    if z_loss is not None:
        z_loss.start()
    # GPTDataset's mask is the plain causal one unless documents are masked from each other;
    # passing None lets attention use its causal kernel.
    mask = batch.get("attention_mask") if use_attention_mask else None
    output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    if z_loss is None:  # the two-argument loss function of pretrain_gpt
        return output, partial(loss_func, batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"], z_loss=z_loss)


def _reduce_reported(
    losses: list[dict], position: RankPosition, device: torch.device, signalled: bool = False
) -> torch.Tensor:
    """``[loss sum, token count, ranks signalled]`` over all micro-batches and ranks: ONE
    all-reduce per step (the preemption flag rides along), no host sync."""
    total = torch.zeros(3, dtype=torch.float32, device=device)
    if position.reports_loss and losses:
        total[:2] += torch.vstack([x["lm loss"].view(-1) for x in losses]).sum(dim=0)
    if signalled:
        total[2] = 1.0
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total


class Trainer:
    """Steps, evaluation, save/load on this rank; hooks do everything periodic.

    Public state hooks may read: ``cfg``, ``objs`` (model, optimizer, scheduler), ``progress``,
    ``log``, ``position``, ``val_losses`` (``[(step, loss)]``, appended by the evaluation hook),
    ``events`` (guard events), ``diagnostics`` (mechanism metrics for the summary), ``downstream``
    (in-loop lm-eval scores by step), ``stop`` (a :class:`StopRequest` once someone asked to stop), ``pending`` (this step's lazy
    loss, during ``before_optimizer_step``).
    """

    def __init__(
        self,
        cfg: MegaspanConfig,
        objs: TrainingObjects,
        datasets,
        position: RankPosition,
        log: MetricsLogger,
        hooks: list[Hook],
        progress: Progress = Progress(0, 0),
        preempt=None,
        tokenizer_hash: str | None = None,
        run_dir_lock=None,
        data_identity: dict | None = None,
    ):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg = cfg
        self.objs = objs
        self.train_ds, self.valid_ds = datasets[0], datasets[1]
        self.position = position
        self.log = log
        self.hooks = list(hooks)
        self.device = runtime.device()
        self.preempt = preempt  # PreemptionFlag or None; its local flag rides on the step's all-reduce
        self.tokenizer_hash = tokenizer_hash  # recorded in checkpoints, checked on load
        self.data_identity = data_identity  # likewise (prefixes, sizes, .idx hashes, blend)
        # Which run this is, recorded in its checkpoints: pruning touches only its own. A fresh
        # start is a new lineage; a resume continues the loaded checkpoint's (see load).
        self.lineage = new_lineage()
        self.saving: PendingSave | None = None  # a checkpoint.async_save write under way
        self._lock = run_dir_lock
        self.fwd_bwd = get_forward_backward_func()
        z = cfg.training.z_loss
        self.z_loss = ZLoss(objs.chunks, z) if z else None
        self.step_fn = partial(forward_step, cfg.data.reset_attention_mask, z_loss=self.z_loss)
        self.progress = progress
        self.stop: StopRequest | None = None
        self.val_losses: list[tuple[int, float]] = []
        self.valid_sets: dict = {}  # data.valid_sets: {name: dataset}, evaluated with valid_ds
        self.named_val_losses: dict[str, list[tuple[int, float]]] = {}
        self.events: list[dict] = []  # guard events: {"step", "kind", "reason", "action"}
        self.diagnostics: dict = {}  # summary.json's "diagnostics" (the diagnostics hook fills it)
        # summary.json's "downstream": {step: {task: {metric: value}}} (the downstream hook fills it)
        self.downstream: dict[int, dict[str, dict[str, float]]] = {}
        self.resolved: dict = {}  # the resolved config, tokenizer hash, world, versions (build_trainer)
        self.pending: StepResult | None = None
        self._skip_reason: str | None = None
        self._train_iters = self.iterators(self.train_ds, progress.consumed_samples)

    # -- data ------------------------------------------------------------------------------

    def iterators(self, dataset, consumed_samples: int) -> list[Iterator[Batch]]:
        """One iterator per model chunk: each virtual stage reads the same micro-batches, but
        only the keys its stage uses (tokens for the first virtual stage, labels and loss mask
        for the last; a middle one reads nothing)."""
        chunks = len(self.objs.model)
        return [
            micro_batches(
                dataset,
                consumed_samples,
                self.cfg.training.micro_batch_size,
                self.position.dp_rank,
                self.position.dp_size,
                self.device,
                vp_stage=i if chunks > 1 else None,
            )
            for i in range(chunks)
        ]

    def seek(self, consumed_samples: int) -> None:
        """Continue training from global sample ``consumed_samples`` (a resume, or a rollback
        that skips a data window)."""
        self.progress = Progress(self.progress.step, consumed_samples)
        _close(getattr(self, "_train_iters", ()))  # stop the old read-ahead
        self._train_iters = self.iterators(self.train_ds, consumed_samples)

    def _run_schedule(self, iterators, forward_only: bool) -> list[dict]:
        return self.fwd_bwd(
            forward_step_func=self.step_fn,
            data_iterator=iterators,
            model=self.objs.model,
            num_microbatches=self.position.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )

    # -- steps -----------------------------------------------------------------------------

    def skip_update(self, reason: str) -> None:
        """From ``before_optimizer_step``: drop this step's parameter update (same on every rank:
        decide from all-reduced values only)."""
        self._skip_reason = reason

    def train_step(self) -> StepResult:
        """One optimizer step over the next global batch; returns its (lazy) result."""
        objs, tr = self.objs, self.cfg.training
        step = self.progress.step + 1
        t0 = time.perf_counter()
        for chunk in objs.model:
            chunk.zero_grad_buffer()
        objs.optimizer.zero_grad()
        losses = self._run_schedule(self._train_iters, forward_only=False)
        signalled = self.preempt is not None and self.preempt.signum is not None
        reduced = Reduced(_reduce_reported(losses, self.position, self.device, signalled))
        lr = objs.scheduler.get_lr(objs.optimizer.param_groups[0])
        self.pending = StepResult(
            step=step,
            grad_norm=None,
            lr=lr,
            num_zeros=None,
            skipped=False,
            step_time_s=0.0,
            tokens=tr.global_batch_size * self.cfg.model.seq_length,
            consumed_samples=self.progress.consumed_samples + tr.global_batch_size,
            reduced=reduced,
        )
        self._skip_reason = None
        call(self.hooks, "before_optimizer_step", self, step)  # gradients not yet clipped
        # The scheduler is stepped first so that update k uses lr(k): with warmup, Megatron's
        # optimizer-then-scheduler order spends the first update on lr = 0.
        objs.scheduler.step(increment=1)
        result = self.pending
        result.lr = objs.scheduler.get_lr(objs.optimizer.param_groups[0])
        if self._skip_reason is None:
            with cuda_free():
                updated, result.grad_norm, result.num_zeros = objs.optimizer.step()
            # Megatron's own non-finite detection (fp16 loss scaling, grad_norm_skip_threshold).
            result.skipped = not updated
        else:
            result.skipped = True
        self.progress = Progress(step, result.consumed_samples)
        result.step_time_s = time.perf_counter() - t0
        self.pending = None
        return result

    def evaluate(self, dataset=None) -> float:
        """Mean validation loss over the first ``eval_steps`` global batches (same ones each time,
        so the curve is comparable across evaluations) of ``dataset`` (default: the validation split)."""
        for chunk in self.objs.model:
            chunk.eval()
        iterators = self.iterators(self.valid_ds if dataset is None else dataset, 0)
        loss_sum = tokens = 0.0
        try:
            with torch.no_grad():
                for _ in range(self.cfg.training.eval_steps):
                    s, t, _ = _reduce_reported(
                        self._run_schedule(iterators, True), self.position, self.device
                    ).tolist()
                    loss_sum, tokens = loss_sum + s, tokens + t
        finally:
            _close(iterators)
        for chunk in self.objs.model:
            chunk.train()
        return loss_sum / max(tokens, 1.0)

    # -- state -----------------------------------------------------------------------------

    def save(self, ckpt_dir: Path | None = None, *, background: bool = False) -> Path | None:
        """Checkpoint the current progress (collective). ``background`` (with
        ``checkpoint.async_save``) returns None once the state is copied to CPU memory; the write
        goes on in a thread and :meth:`finish_save` commits it. A save in flight is committed
        first either way, so checkpoints commit in step order."""
        cfg = self.cfg
        self.finish_save()
        background = background and cfg.checkpoint.async_save
        t0 = time.perf_counter()
        with cuda_free():
            saved = save_checkpoint(
                ckpt_dir or checkpoint_dir(cfg),
                self.progress,
                self.objs.chunks,
                self.objs.optimizer,
                self.objs.scheduler,
                config_to_dict(cfg),
                cfg.checkpoint.keep_last,
                tokenizer_hash=self.tokenizer_hash,
                lineage=self.lineage,
                data_identity=self.data_identity,
                background=background,
            )
        step = self.progress.step
        if isinstance(saved, PendingSave):
            self.saving = saved
            # The time the loop was held: what async_save saves is the rest of the write.
            self.log.scalars({"checkpoint/blocked_s": saved.blocked_s}, step)
            self.log.info(
                f"checkpoint step {step}: writing in the background ({saved.blocked_s:.2f} s blocked)"
            )
            return None
        blocked = time.perf_counter() - t0
        self.log.scalars({"checkpoint/blocked_s": blocked}, step)
        self.log.info(f"saved checkpoint {saved} ({blocked:.2f} s)")
        return saved

    def finish_save(self, *, wait: bool = True) -> Path | None:
        """Commit the background save in flight, if any (collective): at once with ``wait``
        (waiting for its write), else only when every rank has written it (a step-boundary poll
        that costs one small all-reduce while a save is in flight, nothing otherwise)."""
        pending = self.saving
        if pending is None or (not wait and not save_done(pending)):
            return None
        self.saving = None  # a failed write is not retried: its error goes up from here
        path = finish_save(pending)
        write_s = time.perf_counter() - pending.started
        self.log.scalars({"checkpoint/write_s": write_s}, pending.step)
        self.log.info(f"saved checkpoint {path} (written in the background in {write_s:.1f} s)")
        return path

    def load(
        self, path: Path, *, load_optimizer: bool = True, consumed_samples: int | None = None
    ) -> Progress:
        """Restore ``path`` (collective) and continue from its step and data position (or from
        ``consumed_samples``: a rollback that skips data)."""
        objs = self.objs
        with cuda_free():
            progress = load_checkpoint(
                path,
                objs.chunks,
                objs.optimizer,
                objs.scheduler,
                load_optimizer=load_optimizer,
                expected_tokenizer_hash=self.tokenizer_hash,
                expected_data=self.data_identity,
                allow_data_change=self.cfg.checkpoint.allow_data_change,
                expected_model=config_to_dict(self.cfg)["model"],
            )
        self.progress = Progress(progress.step, progress.consumed_samples)
        # A weights-only load starts a new run (lineage None): keep this one's fresh lineage.
        self.lineage = getattr(progress, "lineage", None) or self.lineage
        self.seek(progress.consumed_samples if consumed_samples is None else consumed_samples)
        return progress

    def close(self) -> None:
        """Stop the data read-ahead, flush and close the logs, release the run dir (idempotent).

        The read-ahead threads are joined here rather than left to die with the interpreter: a
        daemon thread still inside a torch op at exit aborted a finished run ("terminate called
        without an active exception", exit 134 under srun)."""
        _close(getattr(self, "_train_iters", ()))
        self._train_iters = []
        self.log.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- loop ------------------------------------------------------------------------------

    def request_stop(
        self, reason: str, exit_code: int, *, status: str = "failed", checkpoint: bool = True
    ) -> None:
        """Stop after the current step (the first request wins). Call it on every rank alike."""
        if self.stop is None:
            self.stop = StopRequest(reason, exit_code, status, checkpoint)

    def fit(self) -> int:
        """Train up to ``training.steps`` (or a stop request); returns the process exit code."""
        try:
            call(self.hooks, "on_fit_start", self)
            while self.stop is None and self.progress.step < self.cfg.training.steps:
                result = self.train_step()
                call(self.hooks, "on_step_end", self, result)
            call(self.hooks, "on_fit_end", self)
        except BaseException as exc:
            for hook in self.hooks:
                hook.on_error(self, exc)
            raise
        return 0 if self.stop is None else self.stop.exit_code

    @property
    def finished(self) -> bool:
        """All ``training.steps`` done and nobody asked to stop early."""
        return self.stop is None and self.progress.step >= self.cfg.training.steps

    def loss_scale(self) -> float | None:
        if not self.objs.config.fp16:
            return None
        return float(self.objs.optimizer.get_loss_scale())


def _close(iterators) -> None:
    """Stop the read-ahead threads of micro-batch iterators (plain iterators have none)."""
    for it in iterators:
        getattr(it, "close", lambda: None)()

"""Build the training objects from Megatron-Core pieces: DDP chunks, optimizer, LR scheduler.

Mirrors ``megatron.training.training.setup_model_and_optimizer`` (which is GPU-only) with the
settings megaspan exposes in its config.
"""

from __future__ import annotations

import contextlib
import math
import sys
import weakref
from dataclasses import dataclass

import torch

from megaspan.config.derived import decay_steps
from megaspan.config.schema import MegaspanConfig
from megaspan.config.validate import check_schedule  # noqa: F401 - moved to config.validate; old import path
from megaspan.models.mcore_config import resolve_dtype


@dataclass
class TrainingObjects:
    model: list  # DDP-wrapped chunks: what the schedules and the optimizer see
    chunks: list  # the bare GPTModel chunks: what checkpoints shard
    optimizer: object  # MegatronOptimizer (ChainedOptimizer)
    scheduler: object  # OptimizerParamScheduler
    config: object  # TransformerConfig
    num_params: int


def cuda_free() -> contextlib.AbstractContextManager:
    """On CPU, run Megatron code that hard-codes ``device="cuda"`` (optimizer, grad scaler, grad
    clipping, dist_checkpointing) with those tensors created on the CPU instead."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from megaspan.runtime.cpu_compat import CudaToCpuMode

    return CudaToCpuMode()


def _wrap_ddp(cfg: MegaspanConfig, chunks: list, tconfig) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    par = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        # Float16Module casts inputs to the model dtype and the loss back to fp32, as in
        # megatron.training.get_model.
        module = Float16Module(tconfig, chunk) if (tconfig.fp16 or tconfig.bf16) else chunk
        # Only the first chunk buckets its grads: later VP chunks' reductions would otherwise
        # be launched out of order (same rule as megatron.training.get_model).
        wrapped.append(DistributedDataParallel(tconfig, ddp_config, module, disable_bucketing=i > 0))
    return wrapped


def _optimizer(cfg: MegaspanConfig, model: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt, prec = cfg.optimizer, cfg.precision
    dtype = resolve_dtype(prec)
    config = OptimizerConfig(
        optimizer=opt.name,
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        loss_scale=prec.loss_scale,
        initial_loss_scale=prec.initial_loss_scale,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        # With a divergence guard, Megatron skips an update whose gradient norm is infinite
        # (fp16's loss scaler already skips non-finite gradients on its own).
        grad_norm_skip_threshold=sys.float_info.max if cfg.training.guard.policy else float("inf"),
    )
    # Biases and norm weights get no weight decay (Megatron's default parameter groups).
    optimizer = get_megatron_optimizer(config, model)
    if cfg.training.guard.policy:
        _nan_norm_is_infinite(optimizer)
    return optimizer


def _nan_norm_is_infinite(optimizer) -> None:
    """Report a NaN gradient norm as +inf, so that ``grad_norm_skip_threshold`` skips the update.

    Why: Megatron's ChainedOptimizer skips when ``grad_norm > threshold``, and NaN compares
    false, so a NaN gradient with a finite loss (an overflow in backward) would be applied and
    leave NaN weights. With +inf the clip coefficient is 0 and the update is skipped; the guard
    then sees a non-finite norm on a skipped step and applies its policy.
    """
    get_norm = optimizer.get_grad_norm

    def get_grad_norm():
        norm = get_norm()
        return math.inf if norm is not None and math.isnan(norm) else norm

    optimizer.get_grad_norm = get_grad_norm


def _scheduler(cfg: MegaspanConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt, sch = cfg.optimizer, cfg.schedule
    # Units are optimizer steps (the trainer steps the scheduler by 1 per iteration).
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=sch.warmup_steps,
        lr_decay_steps=decay_steps(cfg),
        lr_decay_style=sch.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps(cfg),
        wd_incr_style="constant",
        wsd_decay_steps=sch.wsd_decay_steps,
        lr_wsd_decay_style=sch.wsd_decay_style,
    )


def build_training_objects(cfg: MegaspanConfig, vocab_size: int) -> TrainingObjects:
    from megaspan.models import build_model

    built = build_model(cfg, vocab_size)
    return training_objects(cfg, built.chunks, built.config)


def training_objects(cfg: MegaspanConfig, chunks: list, tconfig) -> TrainingObjects:
    """DDP + optimizer + scheduler around built model chunks, and the TransformerConfig hooks the
    schedules call (also used by ``megaspan bench`` for Megatron's stock model)."""
    from megatron.core.distributed import finalize_model_grads

    with cuda_free():
        model = _wrap_ddp(cfg, chunks, tconfig)
        optimizer = _optimizer(cfg, model)
        scheduler = _scheduler(cfg, optimizer)
    # The schedules read these hooks from the TransformerConfig (as megatron.training.train does).
    # Through a weak reference: a bound method here closes the cycle config -> optimizer -> DDP
    # -> modules -> config, which the garbage collector did not free with the distributed
    # optimizer, so every trainer built in a long-lived process (tests, sweeps, notebooks) kept
    # its model and ~20 gloo groups' threads alive.
    scale_loss = weakref.WeakMethod(optimizer.scale_loss)
    tconfig.grad_scale_func = lambda loss: scale_loss()(loss)
    tconfig.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    num_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    return TrainingObjects(model, chunks, optimizer, scheduler, tconfig, num_params)

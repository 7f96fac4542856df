"""Per-rank functions for the layout-equivalence and resharding tests.

Every case drives megaspan's own training path: ``build_training_objects`` (DDP, Megatron
optimizer, scheduler), :class:`megaspan.training.trainer.Trainer` (``train_step`` through
``get_forward_backward_func``, ``evaluate``, ``save``) and ``load_checkpoint``. Only the data is
synthetic: a fixed in-memory dataset with GPTDataset's sample keys, so every layout sees the
same tokens without building a tokenizer or an indexed corpus.

Many cases run in one set of processes (spawning and importing Megatron costs seconds per rank),
each re-initializing Megatron's model-parallel state for its own layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megaspan.config.loader import ConfigError, load_config
from megaspan.config.schema import MegaspanConfig

VOCAB = 128
SEQ = 16
STEPS = 5
MICRO_BATCH = 2
GLOBAL_BATCH = 8
EVAL_STEPS = 2
SEED = 1234

# Layout name -> overrides. World size is implied by the layout (DP fills the rest).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "tp1": (),
    "tp2": ("parallel.tensor_model_parallel_size=2",),
    "tp2-sp": ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"),
    "pp2": ("parallel.pipeline_model_parallel_size=2",),
    "pp2-vpp2": ("parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"),
    "pp2-uneven": (
        "parallel.pipeline_model_parallel_size=2",
        "parallel.num_layers_in_first_pipeline_stage=1",
        "parallel.num_layers_in_last_pipeline_stage=3",
    ),
    "ep2": ("parallel.expert_model_parallel_size=2",),
    "dp2-distopt": ("parallel.use_distributed_optimizer=true",),
    "tp2-sp-pp2": (
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.pipeline_model_parallel_size=2",
    ),
    "dp2-ep2-distopt": ("parallel.expert_model_parallel_size=2", "parallel.use_distributed_optimizer=true"),
}


@dataclass(frozen=True)
class Case:
    """One (model, layout) run: load ``init`` (weights only), train, evaluate, maybe save."""

    placement: str
    moe: bool
    layout: str
    init: str | None  # checkpoint to start from; None = fresh init (then saved as step 0)
    out_dir: str  # this case's checkpoint directory
    save: bool = False  # save the full state after the last step (for the resharding tests)
    steps: int = STEPS

    @property
    def name(self) -> str:
        return f"{self.placement}-{'moe' if self.moe else 'dense'}-{self.layout}"


def layout_config(placement: str, moe: bool, layout: str, ckpt_dir: str, load_optimizer: bool = False) -> MegaspanConfig:
    overrides = [
        f"model.norm_placement={placement}",
        "model.num_layers=4",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        f"model.seq_length={SEQ}",
        "precision.dtype=fp32",
        f"training.steps={STEPS}",
        f"training.micro_batch_size={MICRO_BATCH}",
        f"training.global_batch_size={GLOBAL_BATCH}",
        f"training.eval_steps={EVAL_STEPS}",
        f"training.seed={SEED}",
        f"training.run_dir={ckpt_dir}",
        f"checkpoint.dir={ckpt_dir}",
        "checkpoint.keep_last=null",
        f"checkpoint.load_optimizer={'true' if load_optimizer else 'false'}",
        "schedule.warmup_steps=1",
        "optimizer.lr=3.0e-3",
        "optimizer.min_lr=3.0e-4",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]
    if moe:
        # The auxiliary load-balancing loss stays on (its default): it must reshard too.
        overrides += ["model.moe.num_experts=4", "model.moe.router_topk=2", "model.moe.ffn_hidden_size=32"]
    return load_config(None, overrides + list(LAYOUTS[layout]))


def synthetic_dataset(num_samples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """GPTDataset-shaped samples (tokens, labels, loss_mask, position_ids) from a fixed seed.

    Each sequence follows a fixed bigram rule from a random first token, so a few steps visibly
    lower the loss (uniform random tokens would leave it flat and the comparison weaker).
    """
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        text = torch.empty(SEQ + 1, dtype=torch.long)
        text[0] = torch.randint(0, VOCAB, (1,), generator=g)
        for i in range(SEQ):
            text[i + 1] = (5 * text[i] + 3) % VOCAB
        samples.append(
            dict(
                tokens=text[:-1].clone(),
                labels=text[1:].clone(),
                loss_mask=torch.ones(SEQ),
                position_ids=torch.arange(SEQ),
            )
        )
    return samples


def _trainer(cfg: MegaspanConfig):
    """Megatron state, training objects and the Trainer for ``cfg`` on this rank's layout."""
    import torch.distributed as dist
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    from megaspan.runtime import initialize_model_parallel
    from megaspan.training import trainer as tr
    from megaspan.training.metrics import MetricsLogger
    from megaspan.training.setup import build_training_objects
    from megaspan.training.signals import PreemptionFlag

    torch.manual_seed(SEED)
    initialize_model_parallel(cfg.parallel, SEED)
    layout = tr._layout(cfg)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(
        dist.get_rank(), None, cfg.training.global_batch_size, cfg.training.micro_batch_size, layout.dp_size
    )
    objs = build_training_objects(cfg, VOCAB)
    datasets = (
        synthetic_dataset(STEPS * GLOBAL_BATCH, seed=1),
        synthetic_dataset(EVAL_STEPS * GLOBAL_BATCH, seed=2),
    )
    log = MetricsLogger(
        enabled=False, total_steps=STEPS, run_dir=None, tensorboard=False, progress_bar=False, flops_per_token=None
    )
    return tr.Trainer(cfg, objs, datasets, layout, log, PreemptionFlag())


def _load(trainer, path: str, load_optimizer: bool):
    from megaspan.training.checkpoint import load_checkpoint
    from megaspan.training.setup import cuda_free

    objs = trainer.objs
    with cuda_free():
        return load_checkpoint(Path(path), objs.chunks, objs.optimizer, objs.scheduler, load_optimizer=load_optimizer)


def run_case(case: Case) -> dict:
    """Per-step training losses, final validation loss and (if asked) the saved checkpoint."""
    from megaspan.training.checkpoint import Progress

    start = time.perf_counter()
    cfg = layout_config(case.placement, case.moe, case.layout, case.out_dir)
    trainer = _trainer(cfg)
    if case.init is None:
        trainer.save(Progress(0, 0))  # the shared starting point of every layout
    else:
        _load(trainer, case.init, load_optimizer=False)
    loaded = time.perf_counter()
    iterators = trainer._iterators(trainer.train_ds, 0)
    losses = [trainer.train_step(iterators, step)[0] for step in range(1, case.steps + 1)]
    valid = trainer.evaluate()
    trained = time.perf_counter()
    saved = trainer.save(Progress(case.steps, case.steps * GLOBAL_BATCH)) if case.save else None
    seconds = dict(setup=loaded - start, train=trained - loaded, save=time.perf_counter() - trained)
    return dict(losses=losses, valid=valid, checkpoint=str(saved) if saved else None, seconds=seconds)


def _allow_child_processes() -> None:
    """Let this rank start helper processes.

    The harness spawns ranks as daemons (so they die with pytest), and daemonic processes may
    not have children; dist_checkpointing's file writer starts a multiprocessing Manager for its
    results queue. A real launcher (torchrun, srun) never runs ranks as daemons.
    """
    import multiprocessing

    multiprocessing.current_process().daemon = False


def run_cases(rank: int, world_size: int, cases: list[Case]) -> dict[str, dict]:
    _allow_child_processes()
    return {case.name: run_case(case) for case in cases}


@dataclass(frozen=True)
class Reload:
    """Load ``checkpoint`` into ``layout``: evaluate, and with the full state also train on."""

    placement: str
    moe: bool
    layout: str
    checkpoint: str
    load_optimizer: bool


def reload_case(job: Reload) -> dict:
    """Validation loss right after loading; with the optimizer, losses of the remaining steps."""
    import tempfile

    cfg = layout_config(job.placement, job.moe, job.layout, tempfile.mkdtemp(prefix="megaspan-reload-"))
    trainer = _trainer(cfg)
    try:
        progress = _load(trainer, job.checkpoint, job.load_optimizer)
    except ConfigError as exc:  # a refused load is a result too (its message is tested)
        return dict(error=str(exc))
    valid = trainer.evaluate()
    losses = []
    if job.load_optimizer:
        # Resume exactly where the saved run stopped: same data position and LR schedule.
        iterators = trainer._iterators(trainer.train_ds, progress.consumed_samples)
        losses = [trainer.train_step(iterators, step)[0] for step in range(progress.step + 1, STEPS + 1)]
    return dict(valid=valid, step=progress.step, losses=losses)


def reload_cases(rank: int, world_size: int, jobs: list[Reload]) -> dict[Reload, dict]:
    _allow_child_processes()
    return {job: reload_case(job) for job in jobs}

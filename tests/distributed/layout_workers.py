"""Per-rank functions for the layout-equivalence and resharding tests.

Every case drives megaspan's own training path through its public API: ``build_trainer``
(DDP, Megatron optimizer, scheduler, checkpoint restore) and ``Trainer.fit`` with the built-in
hooks, plus a :class:`LossRecorder` hook defined here. Only the data is synthetic: a fixed
in-memory dataset with GPTDataset's sample keys, so every layout sees the same tokens without
building a tokenizer or an indexed corpus.

Many cases run in one set of processes (spawning and importing Megatron costs seconds per rank),
each re-initializing Megatron's model-parallel state for its own layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megaspan.config.loader import load_config
from megaspan.config.schema import MegaspanConfig
from megaspan.errors import UserError
from megaspan.training.hooks import Hook
from tests.helpers.models import tiny_overrides
from tests.helpers.workers import full_tensor

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
    "pp2-vpp2": (
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
    ),
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
    state: bool = False  # also return training_state() at the end (EP=1, no distributed optimizer)
    extra: tuple[str, ...] = ()  # more config overrides (e.g. the stability switches)
    tag: str = ""  # names the extra overrides in the case name

    @property
    def name(self) -> str:
        return f"{self.placement}-{'moe' if self.moe else 'dense'}-{self.layout}" + (
            f"-{self.tag}" if self.tag else ""
        )


def layout_config(
    placement: str,
    moe: bool,
    layout: str,
    ckpt_dir: str,
    *,
    steps: int = STEPS,
    resume: str = "none",
    load_optimizer: bool = False,
    save_at_end: bool = False,
    extra: tuple[str, ...] = (),
) -> MegaspanConfig:
    # The auxiliary load-balancing loss stays on (its default): it must reshard too.
    overrides = tiny_overrides(placement, moe, seq_length=SEQ, aux_loss=True) + [
        f"training.steps={steps}",
        f"training.micro_batch_size={MICRO_BATCH}",
        f"training.global_batch_size={GLOBAL_BATCH}",
        f"training.eval_steps={EVAL_STEPS}",
        f"training.seed={SEED}",
        f"training.run_dir={ckpt_dir}",
        "training.eval_interval=1000",  # validation at step 0 and after the last step only
        f"checkpoint.dir={ckpt_dir}",
        "checkpoint.keep_last=null",
        f"checkpoint.resume={resume}",
        f"checkpoint.load_optimizer={'true' if load_optimizer else 'false'}",
        f"checkpoint.save_at_end={'true' if save_at_end else 'false'}",
        "schedule.warmup_steps=1",
        # The schedule must not depend on training.steps: a case that stops at step 3 and one
        # that resumes it to step 5 follow the same LR curve as the 5-step reference.
        f"schedule.decay_steps={STEPS}",
        "optimizer.lr=3.0e-3",
        "optimizer.min_lr=3.0e-4",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "logging.log_interval=1000",
    ]
    return load_config(None, overrides + list(LAYOUTS[layout]) + list(extra))


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


class LossRecorder(Hook):
    """A hook from outside the package: the per-step training losses (every rank sees the same
    all-reduced value)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer, result) -> None:
        self.losses.append(result.loss)


def _trainer(cfg: MegaspanConfig, recorder: LossRecorder):
    """The Trainer for ``cfg`` on this rank's layout, through the public builder."""
    from megaspan.training.build import build_trainer

    datasets = (
        synthetic_dataset(STEPS * GLOBAL_BATCH, seed=1),
        synthetic_dataset(EVAL_STEPS * GLOBAL_BATCH, seed=2),
    )
    return build_trainer(cfg, hooks=[recorder], datasets=datasets, vocab_size=VOCAB)


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _global_name(chunk, name: str) -> str:
    """``decoder.layers.<local index>.rest`` -> ``decoder.layers.<global index>.rest`` (PP/VPP
    stages number their layers from 0; ``layer_number`` is Megatron's 1-based global one)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def training_state(trainer) -> dict | None:
    """The resumable state as one process would hold it (collective; returned on rank 0):
    ``adam[(global parameter name, moment)]`` = the full (TP-gathered, every PP stage) Adam moment,
    ``adam_steps`` = Adam's per-parameter step counts, ``scheduler`` = the LR scheduler's
    state_dict and ``lr`` = the LR it gives the next update.

    Read from the live optimizer (Megatron's FP32Optimizer over torch Adam, chained with the expert
    optimizer for MoE), keyed by parameter, so it compares directly across layouts. EP=1 only
    (local expert index = global). The last PP stage's copy of the tied output weight is left out:
    the one-process model has only the embedding.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    assert ps.get_expert_model_parallel_world_size() == 1, "training_state: EP=1 layouts only"
    objs = trainer.objs
    state = {}
    for opt in getattr(objs.optimizer, "chained_optimizers", [objs.optimizer]):
        state.update(opt.optimizer.state)
    gated = objs.config.gated_linear_unit
    adam, steps = {}, {}
    for chunk in objs.chunks:
        for name, param in chunk.named_parameters():
            if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
                continue
            key = _global_name(chunk, name)
            moments = state.get(param, {})  # a missing moment must fail the comparison, not here
            for moment in ADAM_MOMENTS:
                if moment in moments:
                    adam[(key, moment)] = full_tensor(name, param, moments[moment], gated)
            if "step" in moments:
                steps[key] = float(moments["step"])
    merged = [None] * dist.get_world_size()
    dist.all_gather_object(merged, (adam, steps))  # stages hold different layers; TP/DP copies agree
    if dist.get_rank() != 0:
        return None
    out = dict(adam={}, adam_steps={})
    for rank_adam, rank_steps in merged:
        out["adam"].update(rank_adam)
        out["adam_steps"].update(rank_steps)
    out["scheduler"] = objs.scheduler.state_dict()
    out["lr"] = objs.scheduler.get_lr(objs.optimizer.param_groups[0])
    return out


def run_case(case: Case) -> dict:
    """Per-step training losses, final validation loss and (if asked) the saved checkpoint."""
    from megaspan.training.checkpoint import checkpoint_name

    start = time.perf_counter()
    cfg = layout_config(
        case.placement,
        case.moe,
        case.layout,
        case.out_dir,
        steps=case.steps,
        resume=case.init or "none",
        save_at_end=case.save,
        extra=case.extra,
    )
    recorder = LossRecorder()
    trainer = _trainer(cfg, recorder)  # loads ``case.init`` weights-only
    if case.init is None:
        trainer.save()  # the shared starting point of every layout (step 0)
    loaded = time.perf_counter()
    try:
        trainer.fit()  # validation at step 0 and at the end; saves at the end if case.save
        state = training_state(trainer) if case.state else None  # what the checkpoint holds
    finally:
        trainer.close()
    trained = time.perf_counter()
    valid_step, valid = trainer.val_losses[-1]
    assert valid_step == case.steps
    saved = Path(case.out_dir) / checkpoint_name(case.steps) if case.save else None
    seconds = dict(setup=loaded - start, train=trained - loaded)
    return dict(
        losses=recorder.losses,
        valid=valid,
        checkpoint=str(saved) if saved else None,
        state=state,
        seconds=seconds,
    )


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

    cfg = layout_config(
        job.placement,
        job.moe,
        job.layout,
        # Next to the saved run (the test's tmp dir), not in /tmp where nothing removes it.
        tempfile.mkdtemp(prefix="reload-", dir=Path(job.checkpoint).parent.parent),
        resume=job.checkpoint,
        load_optimizer=job.load_optimizer,
    )
    recorder = LossRecorder()
    try:
        trainer = _trainer(cfg, recorder)
    except UserError as exc:  # a refused load is a result too (its message is tested)
        return dict(error=str(exc))
    state = None
    try:
        step = trainer.progress.step
        if job.load_optimizer:
            state = training_state(trainer)  # as loaded, before anything else touches it
        valid = trainer.evaluate()
        if job.load_optimizer:
            # Resume exactly where the saved run stopped: same data position and LR schedule.
            trainer.fit()
    finally:
        trainer.close()
    return dict(valid=valid, step=step, losses=recorder.losses, state=state)


def reload_cases(rank: int, world_size: int, jobs: list[Reload]) -> dict[Reload, dict]:
    _allow_child_processes()
    return {job: reload_case(job) for job in jobs}

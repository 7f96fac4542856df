"""The trainer's extension point, used from outside the package: hooks added through
``build_trainer`` see every step, can stop the run, and cost no host sync unless they read."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaspan.training.build import build_trainer
from megaspan.training.checkpoint import checkpoint_name, find_latest_valid
from megaspan.training.hooks import Hook
from tests.distributed import layout_workers as lw


class Recorder(Hook):
    """Counts every call and keeps the losses: the kind of hook a user would write."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.before: list[int] = []
        self.losses: dict[int, float] = {}

    def on_fit_start(self, trainer) -> None:
        self.calls.append("start")

    def before_optimizer_step(self, trainer, step: int) -> None:
        self.before.append(step)

    def on_step_end(self, trainer, result) -> None:
        self.calls.append("step")
        self.losses[result.step] = result.loss

    def on_fit_end(self, trainer) -> None:
        self.calls.append("end")


def _datasets():
    # One spare global batch: a resume that skips a batch must fail on the losses, not run out
    # of data first (which only crashes).
    return (
        lw.synthetic_dataset((lw.STEPS + 1) * lw.GLOBAL_BATCH, seed=1),
        lw.synthetic_dataset(lw.EVAL_STEPS * lw.GLOBAL_BATCH, seed=2),
    )


def _trainer(tmp_path: Path, *hooks: Hook, **options):
    cfg = lw.layout_config("pre", False, "tp1", str(tmp_path / "run"), **options)
    return build_trainer(cfg, hooks=list(hooks), datasets=_datasets(), vocab_size=lw.VOCAB)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run with a :class:`Recorder`, shared by the module's tests that read it
    (the hook test and the resume tests' reference losses): ``(trainer, recorder)``."""
    from megaspan.runtime import init_process_group, setup_cpu

    setup_cpu()  # what single_process_group does (function-scoped, so not usable here)
    init_process_group()
    rec = Recorder()
    trainer = _trainer(tmp_path_factory.mktemp("straight"), rec)
    try:
        code = trainer.fit()
    finally:
        trainer.close()
    assert code == 0
    return trainer, rec


def test_a_hook_from_outside_sees_every_step(straight):
    trainer, rec = straight
    assert rec.calls == ["start"] + ["step"] * lw.STEPS + ["end"]
    assert rec.before == list(range(1, lw.STEPS + 1))
    assert rec.losses[lw.STEPS] < rec.losses[1] - 0.1  # it really trained
    assert [s for s, _ in trainer.val_losses] == [0, lw.STEPS]


class StopAt(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, result) -> None:
        if result.step == self.step:
            trainer.request_stop("enough", 3, status="failed", checkpoint=True)


def test_a_hook_can_stop_the_run_with_an_exit_code_and_a_checkpoint(single_process_group, tmp_path):
    rec = Recorder()
    trainer = _trainer(tmp_path, StopAt(2), rec)
    try:
        assert trainer.fit() == 3
    finally:
        trainer.close()
    assert sorted(rec.losses) == [1, 2] and trainer.stop.reason == "enough"
    ckpts = tmp_path / "run"
    assert find_latest_valid(ckpts) == ckpts / checkpoint_name(2)


class SyncProbe(Hook):
    """Records whether the step's reduced values were already on the host when it ran."""

    def __init__(self) -> None:
        self.synced: list[bool] = []

    def on_step_end(self, trainer, result) -> None:
        self.synced.append(result.reduced.synced)


def test_no_host_sync_for_the_loss_between_log_steps(single_process_group, tmp_path):
    probe = SyncProbe()
    trainer = _trainer(tmp_path, probe)  # log_interval=1000: only the last step logs
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert probe.synced == [False] * (lw.STEPS - 1) + [True]


@pytest.mark.parametrize("stop_step", [1, 3])
def test_resume_after_a_stop_matches_the_uninterrupted_losses(
    single_process_group, tmp_path, stop_step, straight
):
    first, second = Recorder(), Recorder()
    trainer = _trainer(tmp_path / "b", StopAt(stop_step), first)
    try:
        trainer.fit()
    finally:
        trainer.close()
    trainer = _trainer(tmp_path / "b", second, resume="auto", load_optimizer=True)
    try:
        assert trainer.progress.step == stop_step
        trainer.fit()
    finally:
        trainer.close()
    assert {**first.losses, **second.losses} == straight[1].losses  # exact


def test_train_leaves_a_world_group_it_did_not_create(single_process_group, tmp_path):
    """``train()`` inside a process that already holds the world group (tests, notebooks, a sweep
    worker) destroys only its model-parallel groups; the caller keeps using its world group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megaspan.config.loader import load_config
    from megaspan.training.build import train

    world = dist.group.WORLD
    cfg = load_config(
        "tiny",
        [
            f"training.run_dir={tmp_path / 'run'}",
            "training.steps=2",
            "schedule.warmup_steps=1",
            "training.eval_interval=2",
            "checkpoint.save_at_end=false",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
        ],
    )
    assert train(cfg) == 0
    assert dist.is_initialized() and dist.group.WORLD is world
    assert not parallel_state.model_parallel_is_initialized()
    dist.barrier()  # still usable


@pytest.mark.integration
def test_moe_models_of_different_depth_train_in_one_process(single_process_group, tmp_path):
    """Megatron's MoE aux-loss tracker is process-wide and sized by the first model that records
    into it; a deeper MoE model trained later in the same process must not inherit it (nor the
    aux-loss scale an earlier test's bare backward left: the runtime resets both)."""
    for layers in (2, 4):  # shallower first: the deeper one would index past a 2-layer tracker
        cfg = lw.layout_config(
            "pre", True, "tp1", str(tmp_path / f"run{layers}"), steps=2, extra=(f"model.num_layers={layers}",)
        )
        trainer = build_trainer(cfg, datasets=_datasets(), vocab_size=lw.VOCAB)
        try:
            assert trainer.fit() == 0
        finally:
            trainer.close()

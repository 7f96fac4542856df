"""``eval.downstream`` settings: dotted overrides load into the typed config, and what cannot run
fails in one line naming the key and the fix (the task names against lm-eval's list are checked in
tests/unit/test_downstream_hook.py, which needs the harness)."""

from __future__ import annotations

import pytest

from megaspan.config import load_config, validate
from megaspan.errors import ConfigError


def test_the_keys_load_from_dotted_overrides() -> None:
    cfg = load_config(
        "tiny",
        [
            "eval.downstream.tasks=[hellaswag,piqa]",
            "eval.downstream.interval=100",
            "eval.downstream.limit=50",
            "eval.downstream.include_path=/data/tasks",
            "eval.downstream.batch_size=4",
            "eval.downstream.num_fewshot=0",
        ],
    )
    d = cfg.eval.downstream
    assert (d.tasks, d.interval, d.limit, d.include_path, d.batch_size, d.num_fewshot) == (
        ["hellaswag", "piqa"],
        100,
        50,
        "/data/tasks",
        4,
        0,
    )
    validate(cfg, 1)
    off = load_config("tiny", [])
    assert off.eval.downstream.tasks == [] and off.eval.downstream.interval is None
    validate(off, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["eval.downstream.tasks=[piqa]", "eval.downstream.interval=0"],
            "eval.downstream.interval must be >= 1, got 0",
        ),
        (
            ["eval.downstream.tasks=[piqa]", "eval.downstream.limit=0"],
            "eval.downstream.limit must be >= 1, got 0",
        ),
        (
            ["eval.downstream.tasks=[piqa]", "eval.downstream.batch_size=0"],
            "eval.downstream.batch_size must be >= 1",
        ),
        (
            ["eval.downstream.tasks=[piqa]", "eval.downstream.num_fewshot=-1"],
            "eval.downstream.num_fewshot must be >= 0",
        ),
        (
            ["eval.downstream.interval=10"],
            "eval.downstream.interval is set but eval.downstream.tasks is empty",
        ),
        (["eval.downstream.tasks=[piqa, '']"], r"eval.downstream.tasks\[1\] is empty"),
        (
            ["eval.downstream.tasks=[piqa]", "parallel.context_parallel_size=2"],
            "eval.downstream.tasks with parallel.context_parallel_size > 1 is not supported",
        ),
    ],
    ids=[
        "interval-0",
        "limit-0",
        "batch-0",
        "fewshot-negative",
        "interval-without-tasks",
        "blank-task",
        "cp2",
    ],
)
def test_what_cannot_run_fails_in_one_line(overrides, message) -> None:
    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg, 2)
    assert "\n" not in str(err.value)


def test_unknown_keys_and_types_are_refused_by_the_loader() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'eval.downstream.task'"):
        load_config("tiny", ["eval.downstream.task=[piqa]"])
    with pytest.raises(ConfigError, match=r"eval.downstream.interval: expected"):
        load_config("tiny", ["eval.downstream.interval=often"])

"""Every numeric option has a range, NaN and infinity included, checked by ``validate()``.

The schema walk fails when a numeric field (of the config or of a placement's ``model.norm.*``
options) has no rule in :data:`megaspan.config.ranges.RANGES`, so a new option cannot skip it.
Then every rule is driven out of range through the real loader and ``validate()``, and the cases
of issue 20 run through ``megaspan train`` and ``megaspan plan`` in-process: exit 2, one line
naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

from megaspan.cli import main
from megaspan.config import MegaspanConfig, load_config, validate
from megaspan.config.ranges import RANGES, check_split, numeric_fields
from megaspan.errors import ConfigError, DataError
from megaspan.norms.registry import available


def _norm_option_owner() -> dict[str, str]:
    """model.norm.<option> -> a placement that has it (numeric options only)."""
    owners: dict[str, str] = {}
    for name, cls in sorted(available().items()):
        for key in numeric_fields(cls.Options, "model.norm."):
            owners.setdefault(key, name)
    return owners


def schema_numeric_keys() -> set[str]:
    return set(numeric_fields(MegaspanConfig)) | set(_norm_option_owner())


def test_every_numeric_field_of_the_schema_has_a_range() -> None:
    keys = schema_numeric_keys()
    assert "training.guard.spike_factor" in keys and "model.norm.mixln_alpha" in keys  # the walk recurses
    missing = sorted(keys - set(RANGES))
    assert not missing, f"numeric options without a rule in megaspan/config/ranges.py: {missing}"
    stale = sorted(set(RANGES) - keys)
    assert not stale, f"rules for options that no longer exist: {stale}"


def _field_type(key: str) -> typing.Any:
    """The annotation of a dotted key (norm options: of the placement that owns it)."""
    if key.startswith("model.norm."):
        cls = available()[_norm_option_owner()[key]].Options
        return typing.get_type_hints(cls)[key.rsplit(".", 1)[1]]
    cls: typing.Any = MegaspanConfig
    *sections, name = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return typing.get_type_hints(cls)[name]


def _is_float(key: str) -> bool:
    return "float" in str(_field_type(key))


def _overrides(key: str, value: object) -> list[str]:
    extra = []
    if key.startswith("model.norm."):
        extra.append(f"model.norm_placement={_norm_option_owner()[key]}")
    if key == "data.weights":
        return [*extra, "data.paths=[a]", f"data.weights=[{value}]"]
    return [*extra, f"{key}={value}"]


def _bad_values(key: str) -> list[object]:
    rng = RANGES[key]
    bad: list[object] = []
    if rng.lo is not None:
        bad.append(rng.lo if rng.lo_open else rng.lo - 1)
    if rng.hi is not None:
        bad.append(rng.hi if rng.hi_open else rng.hi + 1)
    if _is_float(key):
        bad += [".nan", ".inf", "-.inf"]
    else:
        bad.append(2**63)
        bad = [int(v) if isinstance(v, float) else v for v in bad]
    return bad


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_rule_refuses_out_of_range_values_in_one_line(key: str) -> None:
    for value in _bad_values(key):
        cfg = load_config("tiny", _overrides(key, value))
        with pytest.raises(ConfigError) as err:
            validate(cfg, 1)
        message = str(err.value)
        assert message.startswith(key), message
        assert "\n" not in message


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_rule_accepts_the_default_or_a_value_inside(key: str) -> None:
    """The rules do not refuse the shipped defaults (an in-range value for the optional ones)."""
    cfg = load_config("tiny", ["model.norm_placement=" + _norm_option_owner()[key]] if "norm." in key else [])
    validate(cfg, 1)


ISSUE_CASES = [
    # issue 20, item 8: tracebacks, then accepted nonsense, then the hang
    ("optimizer.lr=nan", "optimizer.lr must be a finite number >= 0, got nan"),
    ("optimizer.min_lr=nan", "optimizer.min_lr must be a finite number >= 0, got nan"),
    ("optimizer.adam_beta1=1.5", "optimizer.adam_beta1 must be in [0, 1), got 1.5"),
    ("optimizer.adam_eps=-1", "optimizer.adam_eps must be > 0, got -1.0"),
    ("model.hidden_dropout=2.0", "model.hidden_dropout must be in [0, 1), got 2.0"),
    ("training.seed=-1", "training.seed must be in [0, 4294967295], got -1"),
    ("optimizer.lr=inf", "optimizer.lr must be a finite number >= 0, got inf"),
    ("optimizer.clip_grad=-1", "optimizer.clip_grad must be >= 0, got -1.0"),
    ("data.split=abc", "data.split='abc' is not 'train,valid,test' weights"),
    ("model.layernorm_epsilon=-1", "model.layernorm_epsilon must be in (0, 1), got -1.0"),
    ("training.guard.spike_factor=nan", "training.guard.spike_factor must be a finite number > 1, got nan"),
    ("training.steps=100000000000000000000000", "training.steps=100000000000000000000000 does not fit"),
]


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize(("override", "text"), ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_issue_cases_exit_2_in_one_line(
    command: str,
    override: str,
    text: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEGASPAN_CACHE_DIR", str(tmp_path / "cache"))
    args = [command, "--config", "tiny", f"training.run_dir={tmp_path / 'run'}", override]
    if command == "plan":
        args[1:1] = ["--world-size", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], err
    assert "must be" in lines[0] or "like '98,2,0'" in lines[0]  # the fix: the allowed range
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("split", ["abc", "1,2,3,4", "0,0,0", "1.2.3", ""])
def test_split_syntax(split: str) -> None:
    with pytest.raises(ConfigError, match="data.split"):
        check_split(split)
    assert check_split("98,2,0") == [98.0, 2.0, 0.0]


def test_a_sample_count_beyond_the_data_is_refused_before_megatron_counts_epochs() -> None:
    """``training.steps=10**15`` passes the range (it is a valid int64) but would hang in
    Megatron's epoch count: refused from the data's size in one line."""
    from megaspan.data.datasets import _check_index_size

    _check_index_size([(670, 6_000_000)], 300 * 8, 256)  # the tiny run: fine
    with pytest.raises(DataError, match="lower training.steps or add data") as err:
        _check_index_size([(670, 6_000_000)], 10**15 * 8, 256)
    assert "epochs" in str(err.value) and "\n" not in str(err.value)


def test_defaults_are_finite() -> None:
    cfg = MegaspanConfig()
    for key in numeric_fields(MegaspanConfig):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value is None or isinstance(value, list) or math.isfinite(value), key
    assert dataclasses.is_dataclass(cfg)

"""Sweep definition -> cells: ``python -m megaspan.sweep`` (what sweep.sbatch runs) and the thin
``launch/sweep.py`` wrapper (what launch/submit runs); pure Python, no cluster needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megaspan.sweep import spec as sweep_mod

REPO = Path(__file__).resolve().parents[2]
SWEEP_PY = REPO / "launch" / "sweep.py"


def _run(*args: str, wrapper: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SWEEP_PY)] if wrapper else [sys.executable, "-m", "megaspan.sweep"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def _write(tmp_path, text: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


SWEEP = """
name: demo
config: recipes/tiny.yaml
fixed:
  training.steps: 20
  model.hidden_size: 64
axes:
  placements: [pre, spannorm]
  depths: [2, 4]
  lrs: [1.0e-3, 3.0e-4]
  seeds: [1]
"""


def test_list_count_and_cells(tmp_path):
    path = _write(tmp_path, SWEEP)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text("{}\n")
    assert _run("--count", str(path)).stdout.strip() == "8"
    assert _run("--name", str(path)).stdout.strip() == "demo"
    listing = _run("--list", str(path)).stdout
    assert "array size: 8" in listing and "--array=0-7" in listing

    cell = _run("--cell", "5", str(path)).stdout.splitlines()
    # Row-major, first axis slowest: 5 = spannorm (1), depth 2 (0), lr 3e-4 (1), seed 1 (0).
    assert cell[0] == "demo/spannorm-L2-lr0.0003-s1"
    assert cell[1:3] == ["--config", str((tmp_path / "recipes/tiny.yaml").resolve())]
    assert cell[3:] == [
        # W&B grouping (only used when logging.wandb.project is set): the sweep, the cell, its tags.
        "logging.wandb.group=demo",
        "logging.wandb.name=spannorm-L2-lr0.0003-s1",
        'logging.wandb.tags=["placement:spannorm","depth:2","lr:0.0003","seed:1"]',
        "training.steps=20",
        "model.hidden_size=64",
        "model.norm_placement=spannorm",
        "model.num_layers=2",
        "optimizer.lr=0.0003",
        "training.seed=1",
    ]

    names = [_run("--cell", str(i), str(path)).stdout.splitlines()[0] for i in range(8)]
    assert len(set(names)) == 8
    assert _run("--cell", "8", str(path)).returncode == 2


def test_config_name_or_cwd_path_is_passed_unchanged(tmp_path):
    path = _write(tmp_path, SWEEP)  # recipes/tiny.yaml does not exist next to it
    assert _run("--cell", "0", str(path)).stdout.splitlines()[1:3] == ["--config", "recipes/tiny.yaml"]
    path = _write(tmp_path, "name: n\nconfig: tiny\n")
    assert _run("--cell", "0", str(path)).stdout.splitlines()[:3] == ["n/base", "--config", "tiny"]


def test_freeze_roundtrip_needs_no_yaml(tmp_path):
    path = _write(tmp_path, SWEEP)
    frozen = tmp_path / "frozen.json"
    assert _run("--freeze", str(frozen), str(path)).stdout.strip() == "8"
    data = json.loads(frozen.read_text())
    assert len(data["cells"]) == 8
    assert _run("--cell", "5", str(frozen)).stdout == _run("--cell", "5", str(path)).stdout


def test_generic_axes_and_value_formatting(tmp_path):
    path = _write(
        tmp_path,
        """
name: g
axes:
  model.hidden_size: [64]
  precision.fp8: [null]
  model.add_bias_linear: [true, false]
  data.paths: [[a, b]]
""",
    )
    cell = _run("--cell", "1", str(path)).stdout.splitlines()
    assert cell[0] == "g/hidden_size-64-fp8-null-add_bias_linear-false-paths-__a___b__"
    assert cell[1:] == [
        "logging.wandb.group=g",
        "logging.wandb.name=hidden_size-64-fp8-null-add_bias_linear-false-paths-__a___b__",
        "logging.wandb.tags=[]",
        "model.hidden_size=64",
        "precision.fp8=null",
        "model.add_bias_linear=false",
        'data.paths=["a","b"]',
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("axes: {depth: [1]}", "'name'"),
        ("name: x\naxes: {depth: [1]}\nbogus: 1", "unknown top-level"),
        ("name: x\naxes: {notakey: [1]}", "neither an alias"),
        ("name: x\nfixed: {model.num_layers: 2}\naxes: {depth: [1]}", "both fixed and an axis"),
        ("name: x\nfixed: {training.run_dir: /x}", "set per cell"),
        ("name: x\naxes: {lr: [0.001, 1.0e-3]}", "both get the name"),
    ],
)
def test_errors(tmp_path, text, message):
    proc = _run("--list", str(_write(tmp_path, text)))
    assert proc.returncode == 2
    assert message in proc.stderr


def test_expand_api_is_deterministic():
    data = {"name": "n", "axes": {"seed": [1, 2], "depth": [3]}}
    a, b = sweep_mod.expand(data), sweep_mod.expand(data)
    assert a == b
    assert [c["name"] for c in a["cells"]] == ["s1-L3", "s2-L3"]


def test_launch_wrapper_matches_the_package(tmp_path):
    path = _write(tmp_path, SWEEP)
    assert _run("--cell", "5", str(path), wrapper=True).stdout == _run("--cell", "5", str(path)).stdout
    assert _run("--count", str(path), wrapper=True).stdout.strip() == "8"


def test_stdlib_only_under_a_bare_python(tmp_path):
    """sweep.sbatch runs `python3 -m megaspan.sweep` from the checkout: no torch may be imported."""
    path = _write(tmp_path, SWEEP)
    frozen = tmp_path / "frozen.json"
    assert _run("--freeze", str(frozen), str(path)).returncode == 0
    code = (
        f"import sys; sys.argv=['x','--cell','1',{str(frozen)!r}]; "
        "from megaspan.sweep.__main__ import main; rc=main(); "
        "assert 'torch' not in sys.modules and 'yaml' not in sys.modules, sorted(sys.modules); "
        "sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_labelled_bundle_values(tmp_path):
    path = _write(
        tmp_path,
        """
name: b
axes:
  placement:
    - pre
    - {label: spannorm-attn, set: {model.norm_placement: spannorm, model.norm.span_include_attn_term: true}}
  depth: [2]
""",
    )
    sweep = sweep_mod.load_sweep(path)
    assert [c["name"] for c in sweep["cells"]] == ["pre-L2", "spannorm-attn-L2"]
    assert sweep["cells"][1]["overrides"] == [
        "model.norm_placement=spannorm",
        "model.norm.span_include_attn_term=true",
        "model.num_layers=2",
    ]
    assert sweep["cells"][1]["values"] == {"model.norm_placement": "spannorm-attn", "model.num_layers": 2}
    bad = _write(tmp_path, "name: b\naxes:\n  placement: [{label: 'a b', set: {x.y: 1}}]\n", "bad.yaml")
    with pytest.raises(sweep_mod.SweepError, match="label"):
        sweep_mod.load_sweep(bad)


def test_shipped_sweeps_expand():
    for name in ("cpu-small", "paper-h100"):
        sweep = sweep_mod.load_sweep(name)
        assert sweep["name"] == name and sweep["cells"]
    with pytest.raises(sweep_mod.SweepError, match="shipped sweeps: .*cpu-small"):
        sweep_mod.load_sweep("no-such-sweep")

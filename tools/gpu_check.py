"""The GPU node check behind ``tools/gpu_check.sh``: one PASS / FAIL / SKIP / MISS line per check.

    PASS  ran and met its bar
    FAIL  ran and missed it (the line names the tests, steps or runs that did)
    SKIP  does not apply to this machine (no Transformer Engine, fewer than 2 GPUs, BENCH=0, ...)
    MISS  should have run here but left no result (a crash, a timeout, a test that was not
          collected): treated as a failure

Three phases, in order of what they cost:

1. ``pytest tests/gpu`` with a JUnit report, grouped into named checks (every placement on the
   local backend in bf16; on TE in bf16, FP8 tensorwise and FP8 delayed; hybrid; MoE grouped
   GEMM; FP8-delayed save/resume; a local checkpoint loaded into TE). A test that no group
   claims lands in ``tests/gpu (other)``, so a new test is never silently ignored.
2. Training runs through the CLI (``megaspan train``, torchrun for more than one rank), compared
   step by step on the ``step N/M | loss X`` lines:
   * CPU vs GPU: a CPU run trains 8 steps and saves; the CPU and the GPU (local backend, then
     TE) each train 4 more steps from that checkpoint, in fp32 with TF32 off, and their losses
     must agree (rtol 1e-4 local, 1e-3 TE: its fused norm and softmax kernels round
     differently);
   * with >= 2 GPUs: a 1-GPU run seeds a checkpoint; 1 GPU, TP2+SP and PP2 (fp32), CP2 (bf16, TE
     only: TE's CP attention needs its fused kernels) and EP2 (MoE; plus grouped GEMM on TE)
     each train 4 steps from it, and each layout's losses must match the 1-GPU run's.
   Starting every compared run from the same checkpoint with a fresh optimizer removes the
   device's initialisation RNG from the comparison; 8 seed steps leave a model whose loss depends
   on the data, so a layout that feeds a rank the wrong tokens (the CP bug of issue 17) shows.
   Independent runs go side by side on free GPUs.
3. ``megaspan bench`` on the H100 presets (BENCH=0 skips it), and its summary table.

Environment: OUT (results; default runs/gpu_check/<date>), PYTHON, BENCH=0|1, PRESETS,
PRECISIONS, PLACEMENTS, BENCH_ARGS, NPROC (ranks for the MoE bench), ONLY (comma-separated check
names or prefixes: run just those), GPU_CHECK_TIMEOUT (seconds per training run, default 600).
GPU_CHECK_ON_CPU=1 runs phase 2 with CPU processes standing in for GPUs (gloo): how the CPU test
suite exercises this driver end to end; it proves the plumbing, not a GPU.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's megaspan, whatever the interpreter has installed

from megaspan.launchers import megaspan_command  # noqa: E402

PASS, FAIL, SKIP, MISS = "PASS", "FAIL", "SKIP", "MISS"
PRECISIONS = ("bf16", "fp8-tensorwise", "fp8-delayed")


@dataclass
class Result:
    name: str
    status: str
    detail: str
    seconds: float = 0.0

    def line(self) -> str:
        took = f" ({self.seconds:.0f} s)" if self.seconds else ""
        return f"{self.status:<4}  {self.name:<28} {self.detail}{took}"


# --------------------------------------------------------------------------------------------
# Phase 1: tests/gpu, grouped into checks


@dataclass(frozen=True)
class TestGroup:
    name: str
    pattern: str  # regex searched in "tests/gpu/<file>.py::<test>[<params>]"
    what: str


TEST_GROUPS: tuple[TestGroup, ...] = (
    TestGroup(
        "local-cuda-train",
        r"test_gpu_train\.py::test_local_backend_(moe_)?trains_on_cuda\b",
        "every placement (and MoE) trains on CUDA, local backend, bf16",
    ),
    TestGroup(
        "diagnostics-on-cuda",
        r"test_gpu_diagnostics\.py::",
        "diagnostics on CUDA (bf16 snapshot in pinned host memory) and qk_layernorm + z-loss train",
    ),
    TestGroup(
        "te-local-checkpoint",
        r"test_te_backend\.py::test_te_checkpoint_interchangeable_with_local\[",
        "a local-backend checkpoint loads into TE: same logits at TF32 precision",
    ),
    TestGroup(
        "te-fp8-forward-backward",
        r"test_te_backend\.py::test_fp8_forward_backward\[",
        "FP8 forward/backward of the TE layer specs",
    ),
    *(
        TestGroup(
            f"te-train-{precision}",
            rf"test_gpu_train\.py::test_te_trains\[[^\]]*-{re.escape(precision)}\]",
            f"every placement trains on TE in {precision}",
        )
        for precision in PRECISIONS
    ),
    TestGroup(
        "te-moe-grouped-gemm",
        r"test_gpu_train\.py::test_te_moe_grouped_gemm_trains\[",
        "MoE with TE grouped GEMM (DeepNorm's per-expert init) trains",
    ),
    TestGroup("te-hybrid", r"test_gpu_train\.py::test_te_hybrid_trains\[", "model.arch=hybrid trains on TE"),
    TestGroup(
        "fp8-delayed-resume",
        r"test_gpu_train\.py::test_fp8_delayed_save_and_resume\b",
        "FP8 delayed: save, resume, the next steps' losses equal the uninterrupted run's",
    ),
)
OTHER = "tests/gpu (other)"


def parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    """Test id -> (outcome, message) from pytest's ``--junitxml`` file; outcome is one of
    passed, failed, error, skipped."""
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        test_id = f"{classname.replace('.', '/')}.py::{name}" if classname else name
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        outcomes[test_id] = (outcome, message)
    return outcomes


def group_outcomes(outcomes: dict[str, tuple[str, str]], groups=TEST_GROUPS) -> list[Result]:
    """One Result per group (MISS when none of its tests ran), plus one for unclaimed tests."""
    claimed: set[str] = set()
    results = []
    for group in groups:
        members = {t: o for t, o in outcomes.items() if re.search(group.pattern, t)}
        claimed.update(members)
        results.append(_judge(group.name, members, group.what))
    rest = {t: o for t, o in outcomes.items() if t not in claimed}
    if rest:
        results.append(_judge(OTHER, rest, "tests no check claims"))
    return results


def _judge(name: str, members: dict[str, tuple[str, str]], what: str) -> Result:
    if not members:
        return Result(name, MISS, f"no test ran ({what}): see tests_gpu.log")
    bad = [t for t, (o, _) in members.items() if o in ("failed", "error")]
    if bad:
        shown = ", ".join(t.split("::", 1)[-1] for t in bad[:4]) + (" ..." if len(bad) > 4 else "")
        first = members[bad[0]][1]
        return Result(name, FAIL, f"{len(bad)}/{len(members)} failed: {shown}: {first}"[:400])
    skipped = [o for o in members.values() if o[0] == "skipped"]
    if len(skipped) == len(members):
        return Result(name, SKIP, skipped[0][1] or "skipped")
    extra = f", {len(skipped)} skipped" if skipped else ""
    return Result(name, PASS, f"{len(members) - len(skipped)} passed{extra}: {what}")


# --------------------------------------------------------------------------------------------
# Phase 2: training runs compared step by step

STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss (\S+)", re.MULTILINE)

BASE = (
    "model.num_layers=4",
    "training.micro_batch_size=4",
    "training.global_batch_size=8",
    "training.seed=1234",
    "training.eval_interval=100000",
    "schedule.warmup_steps=1",
    "logging.log_interval=1",
    "logging.tensorboard=false",
)
SEED_STEPS, STEPS = 8, 4
MOE = ("model.moe.num_experts=4", "model.moe.router_topk=2", "model.moe.ffn_hidden_size=32")
LOCAL, TE = "model.transformer_impl=local", "model.transformer_impl=transformer_engine"
FP32, BF16 = "precision.dtype=fp32", "precision.dtype=bf16"


@dataclass(frozen=True)
class Run:
    name: str
    overrides: tuple[str, ...]
    nproc: int = 1
    cpu: bool = False  # CUDA hidden: the CPU local backend
    seed: str | None = None  # start from this seed run's last checkpoint (weights only)


@dataclass(frozen=True)
class Comparison:
    name: str
    ref: str
    other: str
    rtol: float
    what: str


def parse_losses(text: str) -> dict[int, float]:
    """Step -> loss from megaspan's console lines (the first line of a step wins)."""
    losses: dict[int, float] = {}
    for step, value in STEP_LINE.findall(text):
        losses.setdefault(int(step), float(value))
    return losses


def compare_losses(
    ref: dict[int, float], other: dict[int, float], rtol: float, steps: int = STEPS
) -> tuple[bool, str]:
    """Every step 1..steps present in both and within ``rtol`` of the reference."""
    missing = [s for s in range(1, steps + 1) if s not in ref or s not in other]
    if missing:
        return False, f"no loss for step(s) {missing}"
    worst_step, worst = 1, 0.0
    for s in range(1, steps + 1):
        a, b = ref[s], other[s]
        if not (math.isfinite(a) and math.isfinite(b)):
            return False, f"step {s}: loss {a} vs {b}"
        rel = abs(a - b) / max(abs(a), 1e-12)
        if rel > worst:
            worst_step, worst = s, rel
    text = f"max rel diff {worst:.1e} (step {worst_step}: {ref[worst_step]:.6f} vs {other[worst_step]:.6f}), rtol {rtol:.0e}"
    return worst <= rtol, text


def plan_runs(ngpu: int, te: bool, only: list[str]) -> tuple[list[Run], list[Comparison], list[Result]]:
    """The runs and comparisons this machine can do, and SKIP results for the rest."""
    impl = TE if te else LOCAL
    runs: list[Run] = []
    comparisons: list[Comparison] = []
    skips: list[Result] = []

    def seeded(name, seed, *overrides, nproc=1, cpu=False):
        runs.append(Run(name, overrides, nproc=nproc, cpu=cpu, seed=seed))

    # CPU vs GPU, fp32, TF32 off (the environment of every phase-2 run)
    runs.append(Run("seed-cpu", (LOCAL, FP32), cpu=True))
    seeded("cpu", "seed-cpu", LOCAL, FP32, cpu=True)
    seeded("gpu-local", "seed-cpu", LOCAL, FP32)
    comparisons.append(Comparison("cpu-vs-gpu-local", "cpu", "gpu-local", 1e-4, "fp32, TF32 off"))
    if te:
        seeded("gpu-te", "seed-cpu", TE, FP32)
        comparisons.append(Comparison("cpu-vs-gpu-te", "cpu", "gpu-te", 1e-3, "fp32, TF32 off"))
    else:
        skips.append(Result("cpu-vs-gpu-te", SKIP, "Transformer Engine not installed"))

    layouts = ("layout-tp2-sp", "layout-pp2", "layout-cp2", "layout-ep2", "layout-ep2-grouped-gemm")
    if ngpu < 2:
        skips += [Result(n, SKIP, f"needs 2 GPUs, {ngpu} visible") for n in layouts]
    else:
        runs.append(Run("seed", (impl, FP32)))
        seeded("ref", "seed", impl, FP32)
        tp2 = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
        seeded("tp2-sp", "seed", impl, FP32, *tp2, nproc=2)
        comparisons.append(Comparison("layout-tp2-sp", "ref", "tp2-sp", 1e-4, "fp32, vs 1 GPU"))
        seeded("pp2", "seed", impl, FP32, "parallel.pipeline_model_parallel_size=2", nproc=2)
        comparisons.append(Comparison("layout-pp2", "ref", "pp2", 1e-4, "fp32, vs 1 GPU"))
        if te:
            seeded("ref-bf16", "seed", impl, BF16)
            seeded("cp2", "seed", impl, BF16, "parallel.context_parallel_size=2", nproc=2)
            comparisons.append(Comparison("layout-cp2", "ref-bf16", "cp2", 2e-2, "bf16, vs 1 GPU"))
        else:
            skips.append(Result("layout-cp2", SKIP, "context parallelism needs Transformer Engine"))
        runs.append(Run("seed-moe", (impl, FP32, *MOE)))
        seeded("ref-moe", "seed-moe", impl, FP32, *MOE)
        seeded("ep2", "seed-moe", impl, FP32, *MOE, "parallel.expert_model_parallel_size=2", nproc=2)
        comparisons.append(Comparison("layout-ep2", "ref-moe", "ep2", 1e-4, "MoE, fp32, vs 1 GPU"))
        if te:
            gg = ("model.moe.grouped_gemm=true",)
            seeded("ref-moe-gg", "seed-moe", impl, FP32, *MOE, *gg)
            seeded(
                "ep2-gg", "seed-moe", impl, FP32, *MOE, *gg, "parallel.expert_model_parallel_size=2", nproc=2
            )
            comparisons.append(
                Comparison(
                    "layout-ep2-grouped-gemm", "ref-moe-gg", "ep2-gg", 1e-4, "MoE TE grouped GEMM, fp32"
                )
            )
        else:
            skips.append(Result("layout-ep2-grouped-gemm", SKIP, "grouped GEMM needs Transformer Engine"))

    if only:
        comparisons = [c for c in comparisons if selected(c.name, only)]
        skips = [s for s in skips if selected(s.name, only)]
        needed = {c.ref for c in comparisons} | {c.other for c in comparisons}
        needed |= {r.seed for r in runs if r.name in needed and r.seed}
        runs = [r for r in runs if r.name in needed]
    return runs, comparisons, skips


def selected(name: str, only: list[str]) -> bool:
    return not only or any(name == o or name.startswith(o) for o in only)


def train_command(run: Run, python: str, run_dir: Path, seed_ckpt: Path | None) -> list[str]:
    steps = STEPS if run.seed else SEED_STEPS
    overrides = [
        *BASE,
        f"training.steps={steps}",
        f"training.run_dir={run_dir}",
        "checkpoint.keep_last=1",
        *run.overrides,
    ]
    if seed_ckpt is not None:
        overrides += [
            f"checkpoint.resume={seed_ckpt}",
            "checkpoint.load_optimizer=false",
            "checkpoint.save_at_end=false",
        ]
    else:
        overrides += ["checkpoint.resume=none"]
    return [*megaspan_command(python, run.nproc), "train", "--config", "tiny", *overrides]


@dataclass
class RunState:
    run: Run
    gpus: list[int] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    rc: int | None = None
    losses: dict[int, float] = field(default_factory=dict)
    error: str = ""


def last_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    return steps[-1] if steps else None


def execute_runs(
    runs: list[Run], out: Path, python: str, ngpu: int, on_cpu: bool, timeout: float
) -> dict[str, RunState]:
    """Run everything, each as soon as its seed is done and enough GPUs are free. CPU runs take
    no GPU; with GPU_CHECK_ON_CPU (a small CPU machine) one run goes at a time."""
    states = {r.name: RunState(r) for r in runs}
    free = list(range(ngpu))
    pending = list(runs)
    active: list[RunState] = []
    (out / "runs").mkdir(parents=True, exist_ok=True)
    while pending or active:
        for state in list(active):
            rc = state.proc.poll()
            if rc is None and time.monotonic() - state.started > timeout:
                os.killpg(state.proc.pid, 9)  # its own session: torchrun and every rank
                state.error = f"timed out after {timeout:.0f} s"
                rc = state.proc.wait()
            if rc is None:
                continue
            active.remove(state)
            free += state.gpus
            state.rc, state.seconds = rc, time.monotonic() - state.started
            log = out / "runs" / f"{state.run.name}.log"
            state.losses = parse_losses(log.read_text(errors="replace"))
            if rc != 0 and not state.error:
                state.error = f"exit {rc}, see {log}"
        for run in list(pending):
            seed = states[run.seed] if run.seed else None
            if seed is not None and seed.rc is None:
                continue  # its seed is still training
            state = states[run.name]
            if seed is not None and (seed.rc != 0 or last_checkpoint(out / "runs" / seed.run.name) is None):
                pending.remove(run)
                state.rc, state.error = (
                    -1,
                    f"seed run {seed.run.name} failed: {seed.error or 'no checkpoint'}",
                )
                continue
            need = 0 if (run.cpu or on_cpu) else run.nproc
            if need > len(free) or (on_cpu and active):
                continue
            pending.remove(run)
            state.gpus, free = free[:need], free[need:]
            start_run(state, out, python, last_checkpoint(out / "runs" / run.seed) if run.seed else None)
            active.append(state)
        time.sleep(0.2)
    return states


def start_run(state: RunState, out: Path, python: str, seed_ckpt: Path | None) -> None:
    env = dict(os.environ)
    # fp32 must mean fp32 on every device: no TF32 in cuBLAS (PyTorch's and TE's GEMMs).
    env.update(NVIDIA_TF32_OVERRIDE="0", TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="0")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, state.gpus))  # "" = CPU
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = train_command(state.run, python, out / "runs" / state.run.name, seed_ckpt)
    with open(out / "runs" / f"{state.run.name}.log", "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        state.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    state.started = time.monotonic()


def judge_comparisons(comparisons: list[Comparison], states: dict[str, RunState]) -> list[Result]:
    results = []
    for c in comparisons:
        broken = [states[n] for n in (c.ref, c.other) if states[n].rc != 0]
        if broken:
            detail = "; ".join(f"{s.run.name}: {s.error}" for s in broken)
            results.append(Result(c.name, MISS, detail))
            continue
        ok, text = compare_losses(states[c.ref].losses, states[c.other].losses, c.rtol)
        took = max(states[c.ref].seconds, states[c.other].seconds)
        results.append(Result(c.name, PASS if ok else FAIL, f"{c.what}: {text}", took))
    return results


# --------------------------------------------------------------------------------------------
# Driver


def machine(python: str, on_cpu: bool) -> tuple[int, bool]:
    """(visible CUDA devices, Transformer Engine importable) as the training processes see them."""
    if on_cpu:
        return 2, False
    probe = (
        "import importlib.util as u, torch;"
        "print(torch.cuda.device_count() if torch.cuda.is_available() else 0,"
        " int(u.find_spec('transformer_engine') is not None))"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), bool(int(out[1]))


def run_pytest(python: str, out: Path) -> list[Result]:
    junit = out / "tests_gpu.xml"
    cmd = [
        python, "-m", "pytest", "-q", "tests/gpu", "-p", "no:randomly",
        f"--junitxml={junit}", f"--basetemp={out / 'pytest-tmp'}", "-o", f"cache_dir={out / '.pytest_cache'}",
    ]  # fmt: skip
    start = time.monotonic()
    with open(out / "tests_gpu.log", "w") as fh:
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    took = time.monotonic() - start
    if not junit.exists():
        return [Result(g.name, MISS, "pytest wrote no report: see tests_gpu.log", took) for g in TEST_GROUPS]
    print(f"pytest tests/gpu: {took:.0f} s", flush=True)
    return group_outcomes(parse_junit(junit))


def run_bench(python: str, out: Path, ngpu: int, te: bool) -> list[Result]:
    if os.environ.get("BENCH", "1") == "0":
        return [Result("bench", SKIP, "BENCH=0")]
    presets = os.environ.get("PRESETS", "h100-1b h100-moe").split()
    precisions = os.environ.get("PRECISIONS", " ".join(PRECISIONS)).split() if te else ["bf16"]
    placements = os.environ.get("PLACEMENTS", "pre,spannorm")
    extra = shlex.split(os.environ.get("BENCH_ARGS", ""))
    nproc = int(os.environ.get("NPROC", str(min(8, ngpu))))
    results, jsons = [], []
    for preset in presets:
        json_path = out / f"bench-{preset}.json"
        args = ["bench", "--preset", preset, "--placements", placements, "--precision", *precisions]
        args += ["--json", str(json_path), *extra]
        cmd = [*megaspan_command(python, nproc if "moe" in preset else 1), *args]
        start = time.monotonic()
        with open(out / f"bench-{preset}.log", "w") as fh:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
        took = time.monotonic() - start
        if rc == 0 and json_path.exists():
            jsons.append(str(json_path))
            results.append(Result(f"bench-{preset}", PASS, f"{' '.join(precisions)}: {json_path}", took))
        else:
            results.append(
                Result(f"bench-{preset}", FAIL, f"exit {rc}: see {out / f'bench-{preset}.log'}", took)
            )
    if jsons:
        summary = subprocess.run(
            [python, "-m", "megaspan", "bench", "--summary", *jsons], cwd=ROOT, capture_output=True, text=True
        )
        (out / "summary.md").write_text(summary.stdout)
        print(summary.stdout, flush=True)
    return results


def main() -> int:
    python = os.environ.get("PYTHON") or sys.executable
    on_cpu = os.environ.get("GPU_CHECK_ON_CPU") == "1"
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S"))
    only = [o for o in os.environ.get("ONLY", "").split(",") if o]
    timeout = float(os.environ.get("GPU_CHECK_TIMEOUT", "600"))
    ngpu, te = machine(python, on_cpu)
    if ngpu == 0:
        print(
            "SKIP  gpu_check                    no CUDA device visible: run it on a GPU node (see tools/gpu_check.sh)"
        )
        return 0
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MEGASPAN_CACHE_DIR", str(out / "cache"))
    kind = "CPU processes standing in for GPUs (GPU_CHECK_ON_CPU=1)" if on_cpu else f"{ngpu} GPU(s)"
    print(f"gpu_check: {kind}, Transformer Engine {'yes' if te else 'no'}, results in {out}", flush=True)
    start = time.monotonic()
    results: list[Result] = []

    def report(new: list[Result]) -> None:
        for r in new:
            print(r.line(), flush=True)
        results.extend(new)

    if not on_cpu:
        info = subprocess.run([python, "-m", "megaspan", "info"], cwd=ROOT, capture_output=True, text=True)
        (out / "info.txt").write_text(info.stdout + info.stderr)
        if any(selected(g.name, only) for g in TEST_GROUPS):
            print("== tests/gpu (pytest)", flush=True)
            report([r for r in run_pytest(python, out) if selected(r.name, only)])

    runs, comparisons, skips = plan_runs(ngpu, te, only)
    if runs:
        print(f"== training runs: {len(runs)}, compared step by step", flush=True)
        states = execute_runs(runs, out, python, 0 if on_cpu else ngpu, on_cpu, timeout)
        report(judge_comparisons(comparisons, states))
        (out / "losses.json").write_text(json.dumps({n: s.losses for n, s in states.items()}, indent=1))
    report(skips)

    if not on_cpu and selected("bench", only):
        print("== megaspan bench", flush=True)
        report(run_bench(python, out, ngpu, te))

    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP, MISS)}
    total = time.monotonic() - start
    print("== gpu_check summary")
    for r in results:
        print(r.line())
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" in {total:.0f} s; details in {out}")
    (out / "gpu_check.json").write_text(
        json.dumps(
            {"gpus": ngpu, "te": te, "seconds": total, "results": [asdict(r) for r in results]}, indent=1
        )
    )
    return 1 if counts[FAIL] or counts[MISS] else 0


if __name__ == "__main__":
    sys.exit(main())

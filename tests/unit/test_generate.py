"""``megaspan generate``: a saved checkpoint loads into one process and decodes correctly.

The reference is the model object that was saved (not the loaded one): greedy decoding from the
loaded checkpoint must pick, at every step, the argmax of that model's full forward pass over the
whole generated sequence. A wrong load (weights, config, placement), a wrong position/window or
an off-by-one in decoding each breaks it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megaspan.evaluate.generate import Sampling, filter_logits, generate_ids, prompt_ids
from megaspan.evaluate.model import load_model
from tests.helpers.cli import clean_env, in_process
from tests.helpers.evaluate import save_tiny

pytestmark = pytest.mark.integration

CASES = [
    ("spannorm", False, "gpt"),
    ("pre", False, "gpt"),
    ("post", True, "gpt"),
    ("mixln", False, "hybrid"),
    ("spannorm", True, "hybrid"),
]


def _full_forward_argmax(chunk, ids: list[int]) -> list[int]:
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        logits = chunk(tokens, positions, None)[0]
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "placement,moe,arch", CASES, ids=[f"{p}-{'moe' if m else 'dense'}-{a}" for p, m, a in CASES]
)
def test_greedy_equals_the_saved_models_full_forward_argmax(
    mcore, tiny_corpus, tmp_path, placement, moe, arch
):
    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, placement, moe, arch=arch)
    model = load_model(path)
    prompt = prompt_ids(model, "The quick brown fox")
    # More new tokens than the context (32) holds: the window slides, as generation does.
    new = generate_ids(model, prompt, Sampling(max_new_tokens=40, temperature=0))
    assert len(new) == 40
    ids = prompt + new
    for step in range(len(new)):
        end = len(prompt) + step  # tokens seen before choosing new[step]
        window = ids[max(0, end - model.max_length) : end]
        assert _full_forward_argmax(chunk, window)[-1] == new[step], f"step {step}"


def test_same_seed_same_text_and_other_seed_other_text(mcore, tiny_corpus, tmp_path):
    tokenizer, _ = tiny_corpus
    _, path, _ = save_tiny(tmp_path / "ckpt", tokenizer)
    model = load_model(path)
    prompt = prompt_ids(model, "import os")
    runs = [generate_ids(model, prompt, Sampling(20, 1.0, 50, 0.95, seed)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [True, True, False, False, False]
    # 0.5 + 0.2 = 0.7 < 0.8, so the third token is still needed to reach p = 0.8.
    assert torch.isfinite(filter_logits(logits, 0, 0.8)).tolist() == [True, True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.1)).tolist() == [True, False, False, False, False]
    generator = torch.Generator().manual_seed(0)
    from megaspan.evaluate.generate import next_token

    draws = {next_token(logits, Sampling(temperature=1.0, top_k=2), generator) for _ in range(200)}
    assert draws == {0, 1}


def test_cli_generates_and_refuses_bad_input_in_one_line(mcore, tiny_corpus, tmp_path):
    tokenizer, _ = tiny_corpus
    _, path, _ = save_tiny(tmp_path / "run" / "checkpoints", tokenizer)
    args = ["--prompt", "def main", "--max-new-tokens", "5", "--temperature", "0"]
    ok = in_process(["generate", "--checkpoint", str(tmp_path / "run"), *args])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1].startswith("def main")
    # A real ``python -m megaspan`` process, the one `generate` run kept out of this process: its
    # whole stderr, imports included, must be the one error line (in-process, the imports and
    # their warnings are already past).
    bad = subprocess.run(
        [sys.executable, "-m", "megaspan", "generate", "--checkpoint", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )  # a directory without any checkpoint
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "is not a megaspan checkpoint" in bad.stderr
    other = tmp_path / "other.model"
    other.write_bytes(tokenizer.path.read_bytes() + b"\0")  # another file: another content hash
    mismatch = in_process(["generate", "--checkpoint", str(path), "--tokenizer", str(other), *args])
    assert mismatch.returncode == 2 and "tokenizer mismatch" in mismatch.stderr, mismatch.stderr

"""``megaspan export``: the Hugging Face folder computes what megaspan computes.

For every placement the exported folder is loaded through ``AutoModelForCausalLM`` (remote code,
offline) and its fp32 logits are compared with the saved megaspan model's on the same tokens. A
wrong equation, norm slot, QKV split, RoPE convention, GQA repeat or final norm in the modeling
file shows up as a logits difference far above fp32 rounding.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megaspan.errors import ConfigError  # noqa: E402
from megaspan.evaluate.hf import export_hf  # noqa: E402
from megaspan.norms import available  # noqa: E402
from tests.helpers.cli import clean_env  # noqa: E402
from tests.helpers.evaluate import save_tiny  # noqa: E402

pytestmark = pytest.mark.integration

PLACEMENTS = sorted(available())
# A 4-layer model: Mix-LN needs floor(alpha L) >= 1 Post-LN block to differ from Pre-LN.
EXTRA = {"mixln": ("model.norm.mixln_alpha=0.5",)}


def _hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, local_files_only=True, output_loading_info=True
    )
    # Every parameter comes from the export (none left at a fresh init, none left over).
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_hf_logits_equal_megaspans(mcore, tiny_corpus, tmp_path, placement, record_property):
    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, placement, extra=EXTRA.get(placement, ()))
    folder = export_hf(str(path), str(tmp_path / "hf"))
    ids = torch.tensor([[tokenizer.eod, *tokenizer.tokenize("import os\ndef main(argv):\n    return 0")]])
    with torch.no_grad():
        want = chunk(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).float()
    got = _hf_logits(folder, ids)
    diff = (got - want).abs().max().item()
    record_property("max_abs_logit_diff", diff)
    print(f"{placement}: max |HF - megaspan| logit = {diff:.3e} (logit scale {want.abs().max().item():.2f})")
    assert diff < 1e-4, diff
    assert json.loads((folder / "config.json").read_text())["norm_placement"] == placement


def test_exported_tokenizer_encodes_like_sentencepiece(mcore, tiny_corpus, tmp_path):
    from transformers import AutoTokenizer

    from megaspan.data.corpus import stdlib_documents

    tokenizer, _ = tiny_corpus
    _, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "pre")
    folder = export_hf(str(path), str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = [" Paris", "  two  spaces\n\tTab", "12345 digits 3.14", "ünïcödé ✓ 日本語 🙂", ""]
    texts += [doc[:3000] for doc in itertools.islice(stdlib_documents("valid"), 40)]
    assert len(texts) > 15
    for text in texts:
        ids = tokenizer.tokenize(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf.decode(ids) == tokenizer.detokenize(ids)
    assert hf.eos_token_id == tokenizer.eod


def test_hybrid_arch_exports_like_gpt(mcore, tiny_corpus, tmp_path):
    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "spannorm", arch="hybrid")
    folder = export_hf(str(path), str(tmp_path / "hf"))
    ids = torch.tensor([[tokenizer.eod, *tokenizer.tokenize("for i in range(3):")]])
    with torch.no_grad():
        want = chunk(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).float()
    assert (_hf_logits(folder, ids) - want).abs().max().item() < 1e-4


def test_moe_export_is_refused_in_one_line(mcore, tiny_corpus, tmp_path):
    tokenizer, _ = tiny_corpus
    _, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "pre", moe=True)
    result = subprocess.run(
        [sys.executable, "-m", "megaspan", "export", "--checkpoint", str(path), "-o", str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "mixture-of-experts" in result.stderr


def test_pre_exports_as_stock_llama(mcore, tiny_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "pre")
    folder = export_hf(str(path), str(tmp_path / "llama"), fmt="llama")
    assert not (folder / "modeling_megaspan.py").exists()
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, output_loading_info=True
    )
    assert isinstance(model, LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[tokenizer.eod, *tokenizer.tokenize("import os\ndef main(argv):\n    return 0")]])
    with torch.no_grad():
        want = chunk(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).float()
        got = model.eval()(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    print(f"pre as Llama: max |HF - megaspan| logit = {diff:.3e}")
    assert diff < 1e-4, diff
    with pytest.raises(ConfigError, match="no stock Llama equivalent.*norm_placement=post"):
        _, other, _ = save_tiny(tmp_path / "post", tokenizer, "post")
        export_hf(str(other), str(tmp_path / "post-llama"), fmt="llama")

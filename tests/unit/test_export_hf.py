"""``megaspan export``: the Hugging Face folder computes what megaspan computes.

For every placement, dense and MoE, the exported folder is loaded through
``AutoModelForCausalLM`` (remote code, offline) and its fp32 logits are compared with the saved
megaspan model's on the same tokens. A wrong equation, norm slot, QKV split, RoPE convention, GQA
repeat or final norm in the modeling file shows up as a logits difference far above fp32
rounding; so does, in MoE blocks, a wrong expert order, router weighting (softmax over the top-k
logits), dense/MoE block pattern or shared expert.
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
TEXT = "import os\ndef main(argv):\n    return 0"
# fp32 rounding leaves at most ~1.2e-6 on these logits (of order 1-5). In the Post-LN family at init a
# block's MLP/MoE barely moves the logits: an MoE router that skips renormalizing its top-k weights
# (each about halved) changes B2T's and DeepNorm's by only ~6e-5, so 1e-4 would let it pass.
TOL = 1e-5


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


def _export_and_compare(tokenizer, tmp_path, placement, moe=False, arch="gpt", extra=(), text=TEXT):
    """Save a tiny model, export it, and return (max |HF - megaspan| logit, logit scale, folder)."""
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, placement, moe, arch=arch, extra=extra)
    folder = export_hf(str(path), str(tmp_path / "hf"))
    ids = torch.tensor([[tokenizer.eod, *tokenizer.tokenize(text)]])
    with torch.no_grad():
        want = chunk(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).float()
    diff = (_hf_logits(folder, ids) - want).abs().max().item()
    return diff, want.abs().max().item(), folder


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_hf_logits_equal_megaspans(mcore, tiny_corpus, tmp_path, placement, moe, record_property):
    tokenizer, _ = tiny_corpus
    diff, scale, folder = _export_and_compare(
        tokenizer, tmp_path, placement, moe, extra=EXTRA.get(placement, ())
    )
    record_property("max_abs_logit_diff", diff)
    kind = "moe" if moe else "dense"
    print(f"{placement} {kind}: max |HF - megaspan| logit = {diff:.3e} (logit scale {scale:.2f})")
    assert diff < TOL, diff
    config = json.loads((folder / "config.json").read_text())
    assert config["norm_placement"] == placement
    # tiny MoE (tests/helpers/models.py): 4 experts, top-2, in every block.
    assert config["num_moe_experts"] == (4 if moe else None)
    assert config["moe_layers"] == [moe] * 4


# MoE variants on top of tests/helpers/models.MOE (4 experts, 32 wide): every other block dense
# (layer_freq=2), a shared expert, top-3 routing (so the top-k weights are a proper subset
# renormalized), QK-norm, a float64 router; and the hybrid arch with LayerNorm and non-gated GeLU
# experts.
MOE_VARIANTS = {
    "mixed-shared-top3-qknorm-fp64router": (
        "pre",
        "gpt",
        (
            "model.moe.layer_freq=2",
            "model.moe.shared_expert_ffn_hidden_size=48",
            "model.moe.router_topk=3",
            "model.moe.router_dtype=fp64",
            "model.qk_layernorm=true",
        ),
    ),
    "hybrid-layernorm-gelu-mixed": (
        "b2t",
        "hybrid",
        ("model.normalization=LayerNorm", "model.activation=gelu", "model.moe.layer_freq=2"),
    ),
}


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_variants_export_exactly(mcore, tiny_corpus, tmp_path, variant):
    tokenizer, _ = tiny_corpus
    placement, arch, extra = MOE_VARIANTS[variant]
    diff, scale, folder = _export_and_compare(tokenizer, tmp_path, placement, True, arch, extra)
    print(f"{variant}: max |HF - megaspan| logit = {diff:.3e} (logit scale {scale:.2f})")
    assert diff < TOL, diff
    assert json.loads((folder / "config.json").read_text())["moe_layers"] == [True, False, True, False]


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
    diff, _, _ = _export_and_compare(
        tokenizer, tmp_path, "spannorm", arch="hybrid", text="for i in range(3):"
    )
    assert diff < TOL, diff


def test_moe_routing_the_modeling_file_lacks_is_refused_before_writing(
    mcore, tiny_corpus, tmp_path, monkeypatch, capsys
):
    """megaspan's config cannot set Megatron's other routers (sigmoid scores, token dropping...),
    but a checkpoint loaded with one must not export as a model that routes differently."""
    import megaspan.evaluate.model as evaluate_model
    from megaspan.cli import main

    tokenizer, _ = tiny_corpus
    _, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "pre", moe=True)
    load = evaluate_model.load_model

    def load_with_capacity(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded.model.config.moe_expert_capacity_factor = 1.0
        return loaded

    monkeypatch.setattr(evaluate_model, "load_model", load_with_capacity)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "moe_expert_capacity_factor=1.0" in err, err
    assert not out.exists()


def test_llama_format_refuses_moe_in_one_line(mcore, tiny_corpus, tmp_path):
    tokenizer, _ = tiny_corpus
    _, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "pre", moe=True)
    out = tmp_path / "llama"
    # A real ``python -m megaspan`` process, the module's one `export` run through the entry point
    # (test_moe_routing_... calls main in this process): its whole stderr, imports included, must
    # be the one error line.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaspan",
            "export",
            "--checkpoint",
            str(path),
            "--format",
            "llama",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "mixture-of-experts" in result.stderr and "--format mixtral" in result.stderr
    assert not out.exists()


def _check_stock(folder, cls, chunk, tokenizer, label: str) -> None:
    """A stock-format export loads as ``cls`` with every weight used, and its fp32 logits equal
    the megaspan chunk's."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, output_loading_info=True
    )
    assert isinstance(model, cls)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[tokenizer.eod, *tokenizer.tokenize(TEXT)]])
    with torch.no_grad():
        want = chunk(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).float()
        got = model.eval()(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    print(f"{label}: max |HF - megaspan| logit = {diff:.3e}")
    assert diff < TOL, diff


def test_pre_exports_as_stock_llama(mcore, tiny_corpus, tmp_path):
    from transformers import LlamaForCausalLM

    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "pre")
    folder = export_hf(str(path), str(tmp_path / "llama"), fmt="llama")
    assert not (folder / "modeling_megaspan.py").exists()
    _check_stock(folder, LlamaForCausalLM, chunk, tokenizer, "pre as Llama")
    with pytest.raises(ConfigError, match="no stock Llama equivalent.*norm_placement=post"):
        _, other, _ = save_tiny(tmp_path / "post", tokenizer, "post")
        export_hf(str(other), str(tmp_path / "post-llama"), fmt="llama")
    with pytest.raises(ConfigError, match="no stock Llama equivalent.*QK-norm"):
        _, other, _ = save_tiny(tmp_path / "qk", tokenizer, "pre", extra=("model.qk_layernorm=true",))
        export_hf(str(other), str(tmp_path / "qk-llama"), fmt="llama")


def test_pre_moe_exports_as_stock_mixtral(mcore, tiny_corpus, tmp_path):
    from transformers import MixtralForCausalLM

    tokenizer, _ = tiny_corpus
    chunk, path, _ = save_tiny(tmp_path / "ckpt", tokenizer, "pre", moe=True)
    folder = export_hf(str(path), str(tmp_path / "mixtral"), fmt="mixtral")
    assert not (folder / "modeling_megaspan.py").exists()
    _check_stock(folder, MixtralForCausalLM, chunk, tokenizer, "pre MoE as Mixtral")
    with pytest.raises(ConfigError, match="no stock Mixtral equivalent.*dense blocks"):
        _, other, _ = save_tiny(
            tmp_path / "mixed", tokenizer, "pre", moe=True, extra=("model.moe.layer_freq=2",)
        )
        export_hf(str(other), str(tmp_path / "mixed-mixtral"), fmt="mixtral")
    assert not (tmp_path / "mixed-mixtral").exists()
    with pytest.raises(ConfigError, match="is a dense model"):
        _, other, _ = save_tiny(tmp_path / "dense", tokenizer, "pre")
        export_hf(str(other), str(tmp_path / "dense-mixtral"), fmt="mixtral")

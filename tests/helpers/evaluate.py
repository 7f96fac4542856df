"""Tiny checkpoints for the judging tests (generate, eval, export), saved in-process through
megaspan's own checkpoint code with the config and tokenizer hash a real run records; and the
offline lm-eval tasks (local JSON, no network) of the eval and downstream-hook tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.models import tiny_overrides


def save_tiny(
    ckpt_dir: Path,
    tokenizer,
    placement: str = "spannorm",
    moe: bool = False,
    *,
    arch: str = "gpt",
    seq_length: int = 32,
    extra: tuple[str, ...] = (),
):
    """Build a tiny model (random init, placement init rules applied), save it as ``step_0000000``
    under ``ckpt_dir``; returns (its model chunk in eval mode, the checkpoint path, the config)."""
    from megaspan.config.loader import config_to_dict, load_config
    from megaspan.data.tokenizer import tokenizer_hash
    from megaspan.training.checkpoint import Progress, save_checkpoint
    from megaspan.training.setup import build_training_objects

    overrides = tiny_overrides(
        placement,
        moe,
        seq_length=seq_length,
        extra=(f"tokenizer.model={tokenizer.path}", f"model.arch={arch}", *extra),
    )
    cfg = load_config(None, overrides)
    objs = build_training_objects(cfg, tokenizer.vocab_size)
    path = save_checkpoint(
        ckpt_dir,
        Progress(0, 0),
        objs.chunks,
        objs.optimizer,
        objs.scheduler,
        config_to_dict(cfg),
        None,
        tokenizer_hash=tokenizer_hash(tokenizer.path),
    )
    chunk = objs.chunks[0]
    chunk.eval()
    return chunk, path, cfg


QUESTIONS = [
    ("The capital of France is", [" Paris", " London", " a dog"], 0),
    ("def main():\n   ", [" return 0", " pass", "print(x)"], 1),
    ("for i in", [" range(10):", " the garden", " 42"], 0),
    ("", [" hello", " world"], 1),  # empty context: scored after the prefix token alone
]
TEXT = (
    "import os\nimport sys\n\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n"
    "        print(name, os.path.getsize(os.path.join(argv[1], name)))\n    return 0\n\n\n"
    "if __name__ == '__main__':\n    sys.exit(main(sys.argv))\n"
) * 3


def write_tasks(tmp_path: Path, text: str) -> Path:
    """Two lm-eval task YAMLs over local JSON files under ``tmp_path`` (offline): multiple choice
    ``megaspan_test_mc`` over :data:`QUESTIONS` and perplexity ``megaspan_test_ppl`` over ``text``;
    returns the directory to pass as the include path."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (data / "ppl.jsonl").write_text(json.dumps({"text": text}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"""task: megaspan_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""
    )
    (tasks / "ppl.yaml").write_text(
        f"""task: megaspan_test_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / "ppl.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
    )
    return tasks

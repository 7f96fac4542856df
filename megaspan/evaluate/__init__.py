"""Judging a trained model: load a checkpoint into one process (:mod:`.model`), sample from it
(:mod:`.generate`), score it with lm-evaluation-harness (:mod:`.harness`) and export it to
Hugging Face ``transformers`` (:mod:`.hf`)."""

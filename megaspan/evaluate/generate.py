"""Sampling from a loaded model: greedy, temperature, top-k and top-p (nucleus).

No KV cache: every new token is one full forward pass over the (at most ``max_length``) last
tokens, so each step is by construction the same computation as training's forward and the
result needs no second path to be trusted. Models here are small enough that this is fast.

Randomness comes from one ``torch.Generator`` seeded with ``seed`` on the CPU, so the same seed
gives the same text on any device (the probabilities are moved to the CPU to draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaspan.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1 = all."""
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: must be >= 0")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``[v]`` logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        logits[order[drop]] = float("-inf")
    return logits


def next_token(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator, vocab_size: int | None = None
) -> int:
    """The next id from ``[v]`` logits; ids from ``vocab_size`` on (embedding padding) never."""
    if vocab_size is not None and vocab_size < logits.numel():
        logits = logits.clone()
        logits[vocab_size:] = float("-inf")
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits.float().cpu() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_ids(model, prompt: list[int], sampling: Sampling, stop: set[int] | None = None) -> list[int]:
    """New token ids after ``prompt`` (a ``LoadedModel``), stopping early at a token in ``stop``
    (which is not returned)."""
    sampling.check()
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = list(prompt)
    out: list[int] = []
    for _ in range(sampling.max_new_tokens):
        window = ids[-model.max_length :]
        logits = model.logits(torch.tensor([window], dtype=torch.long))[0, -1]
        token = next_token(logits, sampling, generator, model.vocab_size)
        if stop and token in stop:
            break
        ids.append(token)
        out.append(token)
    return out


def prompt_ids(model, text: str) -> list[int]:
    """A prompt as the model saw documents in training: preprocessing writes ``text + EOD`` per
    document and no BOS, so a document starts right after the previous one's EOD; that EOD is the
    prefix here (the role GPT-2's ``<|endoftext|>`` plays)."""
    return [model.tokenizer.eod, *model.tokenizer.tokenize(text)]


def generate(model, prompts: list[str], sampling: Sampling) -> list[str]:
    """The continuation of each prompt (text), stopping at the end-of-document token."""
    eod = model.tokenizer.eod
    return [
        model.tokenizer.detokenize(generate_ids(model, prompt_ids(model, text), sampling, stop={eod}))
        for text in prompts
    ]

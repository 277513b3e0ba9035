"""Drafters: whatever proposes tokens for the target to verify.

The engine drives every drafter through the same three calls (the Drafter protocol): prefill
with the prompt and the target's first token, propose up to a budget of tokens, and roll back
to the emitted prefix after the target's verdict. A drafter with a model of its own carries it
and its KV cache as `model` and `kv`; a model-free one (n-gram lookup) has None there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from qspec.engine.compiled import Compiled
from qspec.engine.kv import KV, new_kv
from qspec.engine.sampling import Sampler

# (draft ids, their probabilities under the draft, or None for a deterministic proposal)
Proposal = tuple[torch.Tensor, torch.Tensor | None]


class Drafter(Protocol):
    name: str
    model: torch.nn.Module | None  # None: a model-free drafter
    kv: KV | None  # the draft model's cache, once prefilled

    def prefill(self, tokens: torch.Tensor, capacity: int) -> None:
        """Take the prompt and the target's first token, before the first step."""

    def propose(
        self,
        tokens: torch.Tensor,
        budget: int,
        sampler: Sampler,
        generator: torch.Generator | None,
        history: list[int],
        stop_below: float | None = None,
    ) -> Proposal:
        """Up to `budget` drafts after `tokens` (on the device; `history` is the same on the
        host); with stop_below, stop at the first draft whose probability falls below it."""

    def rollback(self, n_tokens: int) -> None:
        """Forget everything past the first n_tokens tokens."""


@dataclass
class ModelDrafter:
    """A smaller model, or the target's own quantized copy, with its own KV cache."""

    model: torch.nn.Module
    name: str = "model"
    compiled: Compiled | None = None  # the caller's compile decision for this model
    kv: KV | None = None

    def prefill(self, tokens: torch.Tensor, capacity: int) -> None:
        """Allocates the cache and runs the prefix (prompt + the target's first token) through
        the draft in one forward, timed apart from the steps; its last logits give the first
        draft token, so the first step costs no more draft forwards than any other."""
        self.kv = new_kv(self.model, capacity, self.compiled, slot="draft")
        self.next_logits = self.kv.forward(tokens, last_only=True)[-1]
        self.ids = tokens.new_empty(0)

    def propose(self, tokens, budget, sampler: Sampler, generator, history, stop_below=None):
        pending = tokens[self.kv.length :]  # 1 token, or 2 after a full accept
        n = budget
        for i in range(budget):
            # only the last position's logits are needed; several pending tokens take the
            # (never compiled) prefill path, so compiled steps keep their one-token shape
            if pending.numel():
                logits = self.kv.forward(pending, last_only=pending.numel() > 1)[-1]
            else:  # right after the prefill, which ran the whole prefix
                logits = self.next_logits
            if i == 0 and self.ids.numel() < budget:  # buffers reused across steps
                self.ids = tokens.new_empty(budget)
                self.probs = logits.new_empty(budget, logits.shape[-1], dtype=torch.float32)
            self.ids[i] = sampler.pick(logits, generator)
            if not sampler.greedy:
                self.probs[i] = sampler.probs(logits)
            if stop_below is not None and self._confidence(logits, i, sampler) < stop_below:
                n = i  # one host sync per draft token, the price of stopping early
                break
            pending = self.ids[i : i + 1]
        return self.ids[:n], (None if sampler.greedy else self.probs[:n])

    def _confidence(self, logits, i, sampler) -> float:
        """The draft's probability of the token it just drafted."""
        probs = self.probs[i] if not sampler.greedy else logits.float().softmax(-1)
        return float(probs[self.ids[i]])

    def rollback(self, n_tokens: int) -> None:
        self.kv.rollback(n_tokens)


@dataclass
class NgramDrafter:
    """Prompt-lookup decoding: copy what followed the latest earlier match of the last n tokens.

    Needs no model; wins on inputs that repeat (code edits, RAG, summarisation).
    """

    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "ngram"
    model: None = None
    kv: None = None

    def prefill(self, tokens: torch.Tensor, capacity: int = 0) -> None:
        pass

    def propose(self, tokens, budget, sampler, generator, history, stop_below=None):
        seq = history
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    follow = seq[start + n : start + n + budget]
                    return torch.tensor(follow, dtype=tokens.dtype, device=tokens.device), None
        return tokens.new_empty(0), None

    def rollback(self, n_tokens: int) -> None:
        pass


# the config validates drafter names against models/precisions.py (torch-free); a test keeps
# the two in step
MODEL_FREE_DRAFTERS = {"ngram": NgramDrafter}

"""Drafters: whatever proposes tokens for the target to verify.

The engine drives every drafter through the same three calls (the Drafter protocol): prefill
with the prompt and the target's first token, propose up to a budget of tokens, and roll back
to the emitted prefix after the target's verdict. A drafter with a model of its own carries it
and its KV cache as `model` and `kv`; a model-free one (n-gram lookup) has None there.

What a drafter may ask of the target's forward is part of the protocol too: `target_layers`
names the target's hidden-state layers it reads (an EAGLE head reads three of them); the
engine then hands it those states for the prompt at prefill, and for the positions the target
has just verified and kept at each rollback. Every other drafter asks for none: ().

Prediction (measure/prediction.py) asks a drafter one more thing, `first_draft_q`: the
distribution its first draft would be drawn from at every position of a given text, so that
acceptance can be predicted from teacher-forced distributions without generating.
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
    target_layers: tuple[int, ...]  # the target's hidden-state layers it reads; () for none

    def prefill(
        self, tokens: torch.Tensor, capacity: int, target_states: torch.Tensor | None = None
    ) -> None:
        """Take the prompt and the target's first token, before the first step (and, for a
        drafter that reads them, the target's states at every prompt position)."""

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

    def rollback(self, n_tokens: int, target_states: torch.Tensor | None = None) -> None:
        """Forget everything past the first n_tokens tokens (a drafter that reads the target's
        states gets those of the positions the step verified and kept)."""

    def first_draft_q(
        self, ids: torch.Tensor, start: int, sampler: Sampler, vocab: int
    ) -> FirstDrafts:
        """q of the first draft at each position of ids[start:] (reading the ids before it),
        over a target vocabulary of `vocab` tokens."""


@dataclass(frozen=True)
class FirstDrafts:
    """What a drafter's first draft would be drawn from at each position of a text: rows of
    probabilities over the target's vocabulary (one-hot for a deterministic proposal), and
    where it proposes at all (n-gram lookup finds no match at some positions)."""

    q: torch.Tensor  # (positions, V)
    proposes: torch.Tensor  # (positions,) bool


def one_hot_drafts(proposals: list[int | None], vocab: int, device) -> FirstDrafts:
    """FirstDrafts of a deterministic drafter: one-hot rows where it proposed a token."""
    q = torch.zeros(len(proposals), vocab, device=device)
    has = torch.tensor([t is not None for t in proposals], dtype=torch.bool, device=device)
    for i, t in enumerate(proposals):
        if t is not None:
            q[i, t] = 1.0
    return FirstDrafts(q, has)


def fit_vocab(q: torch.Tensor, vocab: int) -> torch.Tensor:
    """Rows over a draft's vocabulary laid over the target's `vocab` ids (the same tokenizer,
    logits padded to another width): columns past either width carry no probability."""
    if q.shape[-1] == vocab:
        return q
    out = q.new_zeros(q.shape[0], vocab)
    width = min(vocab, q.shape[-1])
    out[:, :width] = q[:, :width]
    return out


@torch.inference_mode()
def teacher_forced_logits(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits predicting ids[start:], from one forward pass over ids[:-1]."""
    logits = model(input_ids=ids[:-1].view(1, -1), use_cache=False).logits[0]
    return logits[start - 1 :]


@dataclass
class ModelDrafter:
    """A smaller model, or the target's own quantized copy, with its own KV cache."""

    model: torch.nn.Module
    name: str = "model"
    compiled: Compiled | None = None  # the caller's compile decision for this model
    kv: KV | None = None
    target_layers: tuple[int, ...] = ()

    def prefill(self, tokens: torch.Tensor, capacity: int, target_states=None) -> None:
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

    def rollback(self, n_tokens: int, target_states=None) -> None:
        self.kv.rollback(n_tokens)

    def first_draft_q(self, ids, start, sampler: Sampler, vocab: int) -> FirstDrafts:
        logits = teacher_forced_logits(self.model, ids, start)
        q = logits.float().softmax(-1) if sampler.greedy else sampler.probs(logits)
        q = fit_vocab(q, vocab)
        return FirstDrafts(q, torch.ones(q.shape[0], dtype=torch.bool, device=q.device))


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
    target_layers: tuple[int, ...] = ()

    def prefill(self, tokens: torch.Tensor, capacity: int = 0, target_states=None) -> None:
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

    def rollback(self, n_tokens: int, target_states=None) -> None:
        pass

    def first_draft_q(self, ids, start, sampler, vocab: int) -> FirstDrafts:
        """One-hot at the first token of the lookup's proposal at each position."""
        host = ids.tolist()
        first = []
        for pos in range(start, ids.numel()):
            proposal, _ = self.propose(ids[:pos], 1, sampler, None, host[:pos])
            first.append(int(proposal[0]) if proposal.numel() else None)
        return one_hot_drafts(first, vocab, ids.device)


# the config validates drafter names against models/precisions.py (torch-free); a test keeps
# the two in step
MODEL_FREE_DRAFTERS = {"ngram": NgramDrafter}

"""Drafters: whatever proposes tokens for the target to verify.

A drafter has three methods: prefill(prefix, capacity, compile) with the prompt and the
target's first token, propose(tokens, gamma,
sampler, generator, history) -> (draft ids, draft probabilities or None), and
rollback(n) to forget everything past the first n tokens. `tokens` is the sequence on
the device, `history` the same on the host. `None` probabilities mean a deterministic proposal (a one-hot q).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qspec.engine.kv import new_kv
from qspec.engine.sampling import Sampler
from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES


@dataclass
class ModelDrafter:
    """A smaller model, or the target's own quantized copy, with its own KV cache."""

    model: torch.nn.Module
    name: str = "model"
    kv: object = None

    def prefill(self, tokens: torch.Tensor, capacity: int, compile: bool = False) -> None:
        """Allocates the cache and runs the prefix (prompt + the target's first token) through
        the draft in one forward, timed apart from the steps; its last logits give the first
        draft token, so the first step costs no more draft forwards than any other."""
        self.kv = new_kv(self.model, capacity, compile, slot="draft")
        self.next_logits = self.kv.forward(tokens, last_only=True)[-1]
        self.ids = tokens.new_empty(0)

    def propose(self, tokens, gamma, sampler: Sampler, generator, history=None, stop_below=None):
        """Up to gamma draft tokens; with stop_below, drafting stops at the first token whose
        probability under the draft falls below it (one host sync per draft token)."""
        pending = tokens[self.kv.length :]  # 1 token, or 2 after a full accept
        n = gamma
        for i in range(gamma):
            # only the last position's logits are needed; several pending tokens take the
            # (never compiled) prefill path, so compiled steps keep their one-token shape
            if pending.numel():
                logits = self.kv.forward(pending, last_only=pending.numel() > 1)[-1]
            else:  # right after the prefill, which ran the whole prefix
                logits = self.next_logits
            if i == 0 and self.ids.numel() < gamma:  # buffers reused across steps
                self.ids = tokens.new_empty(gamma)
                self.probs = logits.new_empty(gamma, logits.shape[-1], dtype=torch.float32)
            self.ids[i] = sampler.pick(logits, generator)
            if not sampler.greedy:
                self.probs[i] = sampler.probs(logits)
            if stop_below is not None and self._confidence(logits, i, sampler) < stop_below:
                n = i
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

    def prefill(self, tokens: torch.Tensor, capacity: int = 0, compile: bool = False) -> None:
        pass

    def propose(self, tokens, gamma, sampler, generator, history=None, stop_below=None):
        seq = history if history is not None else tokens.tolist()
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    follow = seq[start + n : start + n + gamma]
                    return torch.tensor(follow, dtype=tokens.dtype, device=tokens.device), None
        return tokens.new_empty(0), None

    def rollback(self, n_tokens: int) -> None:
        pass


MODEL_FREE_DRAFTERS = {"ngram": NgramDrafter}
assert tuple(MODEL_FREE_DRAFTERS) == MODEL_FREE_DRAFTER_NAMES


def check_same_tokenizer(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise ValueError(
            f"draft {draft_name!r} uses a different tokenizer from target {target_name!r} "
            f"({len(draft_tok)} vs {len(target_tok)} tokens, or different ids): "
            "speculative decoding needs the same vocabulary"
        )

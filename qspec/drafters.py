"""Drafters: whatever proposes tokens for the target to verify.

A drafter has three methods: prefill(tokens), propose(tokens, gamma, sampler, generator)
-> (draft ids, draft probabilities or None), and rollback(n) to forget everything past
the first n tokens. `None` probabilities mean a deterministic proposal (a one-hot q).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qspec.kv import forward, new_cache, truncate
from qspec.sampling import Sampler


@dataclass
class ModelDrafter:
    """A smaller model, or the target's own quantized copy, with its own KV cache."""

    model: torch.nn.Module
    name: str = "model"
    cache: object = None

    def prefill(self, tokens: torch.Tensor) -> None:
        self.cache = new_cache(self.model)
        if tokens.numel() > 1:
            forward(self.model, tokens[:-1], self.cache, last_only=True)

    def propose(self, tokens, gamma, sampler: Sampler, generator):
        pending = tokens[self.cache.get_seq_length() :]  # 1 token, or 2 after a fully accepted step
        ids, probs = [], []
        for _ in range(gamma):
            logits = forward(self.model, pending, self.cache, last_only=True)[-1]
            nxt = sampler.pick(logits, generator)
            if not sampler.greedy:
                probs.append(sampler.probs(logits))
            ids.append(nxt)
            pending = nxt.view(1)
        draft = torch.stack(ids) if ids else tokens.new_empty(0)
        return draft, (torch.stack(probs) if probs else None)

    def rollback(self, n_tokens: int) -> None:
        truncate(self.cache, n_tokens)


@dataclass
class NgramDrafter:
    """Prompt-lookup decoding: copy what followed the latest earlier match of the last n tokens.

    Needs no model; wins on inputs that repeat (code edits, RAG, summarisation).
    """

    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "ngram"

    def prefill(self, tokens: torch.Tensor) -> None:
        pass

    def propose(self, tokens, gamma, sampler, generator):
        seq = tokens.tolist()
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


def check_same_tokenizer(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise ValueError(
            f"draft {draft_name!r} uses a different tokenizer from target {target_name!r} "
            f"({len(draft_tok)} vs {len(target_tok)} tokens, or different ids): "
            "speculative decoding needs the same vocabulary"
        )

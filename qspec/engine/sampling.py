"""The logits -> probabilities transform shared by target and draft.

Speculative sampling is only lossless when p and q go through the same transform,
so there is exactly one implementation of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Rows of logits (..., V) -> rows of probabilities after temperature, top-k, top-p."""
        logits = logits.float() / max(self.temperature, 1e-6)
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # Drop a token when the mass strictly before it already reaches top_p; the first always stays.
            before = sorted_probs.cumsum(-1) - sorted_probs
            drop_sorted = before >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row: argmax when greedy, else a draw from probs()."""
        if self.greedy:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=generator).squeeze(-1)


def sampler_for(mode: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    if mode == "greedy":
        return Sampler(greedy=True)
    return Sampler(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p)


GREEDY = Sampler()

"""An EAGLE-3 head as a drafter: it reads the target's hidden states through the Drafter
protocol's `target_layers`, drafts autoregressively from its own states, and rolls back
with the target.

The head's cache holds one entry per target position p: the head layer's keys and values
computed from the target's fused states at p and the token at p + 1. After a step the target
has verified some positions; the next `propose` first writes their entries (one forward of
the head over them, reading the target's states), whose last output is the step's first
draft, then drafts the rest from its own pre-norm states, as vLLM's EAGLE proposer does.
Draft entries are written past the verified ones and dropped at the next rollback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qspec.engine.drafters import FirstDrafts
from qspec.engine.eagle_head import EagleHead, HeadCache
from qspec.engine.sampling import Sampler


@dataclass
class HeadDrafter:
    head: EagleHead
    name: str = "eagle3"
    kv: HeadCache | None = None
    target_model: torch.nn.Module | None = None  # teacher-forced prediction only
    verified: int = 0  # cache entries made from the target's own states
    pending: torch.Tensor | None = None  # target states of positions verified, not yet written

    def __post_init__(self) -> None:
        if self.target_model is not None:
            layers = self.target_model.config.get_text_config(decoder=True).num_hidden_layers
            if layers in self.target_layers:  # transformers gives that one after the final norm
                raise ValueError(
                    f"aux layer {layers} (the last layer's pre-norm output) is not read by "
                    "qspec's engine; vLLM serves such a head"
                )

    @property
    def model(self) -> EagleHead:
        return self.head

    @property
    def target_layers(self) -> tuple[int, ...]:
        return self.head.cfg.aux_layers

    def prefill(self, tokens: torch.Tensor, capacity: int, target_states=None) -> None:
        """tokens: the prompt and the target's first token; target_states: the target's states
        at every prompt position, written at the first propose (its draft's forward)."""
        if target_states is None or target_states.shape[0] != tokens.numel() - 1:
            raise ValueError("an EAGLE head needs the target's states at every prompt position")
        self.kv = self.head.new_cache(capacity)
        self.verified, self.pending = 0, target_states

    @torch.inference_mode()
    def propose(self, tokens, budget, sampler: Sampler, generator, history, stop_below=None):
        logits, state = self._catch_up(tokens)
        ids = tokens.new_empty(budget)
        probs = None if sampler.greedy else logits.new_empty(budget, logits.shape[-1])
        n = budget
        for i in range(budget):
            ids[i] = sampler.pick(logits, generator)
            row = None if sampler.greedy else sampler.probs(logits)
            if probs is not None:
                probs[i] = row
            if stop_below is not None:
                row = row if row is not None else logits.float().softmax(-1)
                if float(row[ids[i]]) < stop_below:
                    n = i
                    break
            if i + 1 < budget:
                pos = torch.tensor([self.verified + i], device=ids.device)
                out, state = self.head(ids[i : i + 1], state, pos, self.kv)
                logits = out[-1]
        return ids[:n], (None if probs is None else probs[:n])

    def _catch_up(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the entries of the positions the target verified since the last step (their
        states, and the token after each); the last one's output is the next token's draft."""
        n = self.pending.shape[0]
        start = self.verified
        pos = torch.arange(start, start + n, device=tokens.device)
        fused = self.head.fuse(self.pending.to(self.head.fc.weight.dtype))
        out, prenorm = self.head(tokens[start + 1 : start + n + 1], fused, pos, self.kv)
        self.verified, self.pending = start + n, None
        return out[-1], prenorm[-1:]

    def rollback(self, n_tokens: int, target_states=None) -> None:
        """Drop the draft entries; keep the target's states of the positions the step verified
        and kept, to be written at the next propose (after a step that drafted nothing, they
        join those still pending): n_tokens - verified of them in all."""
        self.kv.rollback(self.verified)
        if target_states is None:
            raise ValueError("an EAGLE head needs the target's states of every kept position")
        if self.pending is not None:
            target_states = torch.cat([self.pending, target_states])
        if target_states.shape[0] != n_tokens - self.verified:
            raise ValueError("an EAGLE head needs the target's states of every kept position")
        self.pending = target_states

    @torch.inference_mode()
    def first_draft_q(self, ids, start, sampler: Sampler, vocab: int) -> FirstDrafts:
        """The head's first draft at each position of ids[start:], from a teacher-forced pass
        of the target (its states) and one of the head over them: position t's first draft is
        the output of the entry at t - 2 (the state of t - 2, the token at t - 1)."""
        states = target_states(self.target_model, ids[:-1], self.target_layers)
        cache = self.head.new_cache(ids.numel())
        pos = torch.arange(ids.numel() - 1, device=ids.device)
        out, _ = self.head(ids[1:], self.head.fuse(states), pos, cache)
        logits = out[start - 2 : ids.numel() - 2]
        q = logits.float().softmax(-1) if sampler.greedy else sampler.probs(logits)
        return FirstDrafts(q, torch.ones(q.shape[0], dtype=torch.bool, device=q.device))


@torch.inference_mode()
def target_states(target, ids: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """The target's hidden states of `layers` at every position of ids, teacher-forced."""
    out = target(input_ids=ids.view(1, -1), use_cache=False, output_hidden_states=True)
    return torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)

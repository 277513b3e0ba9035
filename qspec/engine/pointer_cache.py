"""The static cache's storage: every layer's keys and values allocated once, written at the
positions the cache chose for this forward, so that rolling back is moving a length pointer
(kv.py) and every forward of one length has the same shapes and addresses (compiled.py)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer


class _PointerLayer(StaticLayer):
    """A StaticLayer that writes at the positions its cache chose for this forward."""

    def __init__(self, owner: PointerCache, max_cache_len: int):
        super().__init__(max_cache_len=max_cache_len)
        self.owner = owner

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        at = self.owner.write_at
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.length


class PointerCache(Cache):
    def __init__(self, n_layers: int, capacity: int):
        self.length = 0
        self.write_at: torch.Tensor | None = None
        super().__init__(layers=[_PointerLayer(self, capacity) for _ in range(n_layers)])


def forward_step(
    model, cache: PointerCache, ids, pos, kv_index, keep: int = 0, layers: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of ids at positions pos; a causal mask over the whole static cache.

    Returns (logits, states): states are the hidden states of `layers` at every fed position,
    concatenated (len(ids), len(layers) * hidden), for a drafter that reads them (an EAGLE
    head); None when no layer is asked for."""
    mask = (kv_index <= pos.view(-1, 1)).view(1, 1, pos.numel(), kv_index.numel())
    out = model(
        input_ids=ids.view(1, -1),
        position_ids=pos.view(1, -1),
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
        output_hidden_states=bool(layers),
    )
    return out.logits[0], hidden_states(out, layers)


def hidden_states(out, layers: tuple[int, ...]) -> torch.Tensor | None:
    """transformers' hidden_states[i] is the residual stream after i decoder layers (what
    vLLM's EAGLE-3 auxiliary layer id i reads), for every i below the last (normed) one."""
    if not layers:
        return None
    return torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)

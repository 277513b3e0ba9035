"""KV caches for the decode loop: one forward at a time, exact rollback.

StaticKV is the lean path: every layer's keys and values are allocated once, sized for
prompt + max_new_tokens + gamma + 1, and rolling back is moving a length pointer; what
lies past the pointer is masked out and overwritten later, never copied. Because every
forward of a given length has the same shapes, it can be compiled (CUDA graphs
included). DynamicKV wraps transformers' DynamicCache for models the static path cannot
serve (sliding-window or mixed attention, or an attention kernel without masks).

Both expose the same things: `length`, `forward(ids)`, `rollback(n)`, `nbytes()`, and
`forward_states(ids, layers)`, which also returns hidden states of the given layers (for a
drafter that reads the target's states). A compiled forward (compiled.py) is the caller's
choice, passed in; nothing is compiled here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from qspec.engine.pointer_cache import PointerCache, forward_step, hidden_states

if TYPE_CHECKING:
    from qspec.engine.compiled import Compiled


def static_supported(model) -> str | None:
    """None when the static path can serve this model, else the reason it cannot."""
    cfg = model.config.get_text_config(decoder=True)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":  # the boolean 4-D mask below is what sdpa takes
        return f"attention implementation {impl!r}"
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"layer types {sorted(types)}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return f"sliding window {cfg.sliding_window}"
    return None


class StaticKV:
    """Pre-allocated keys/values for one model and one sequence; rollback moves a pointer."""

    path = "static"

    def __init__(
        self, model, capacity: int, compiled: Compiled | None = None, slot: str = "target"
    ):
        self.model = model
        self.step = compiled.step if compiled is not None else forward_step
        if compiled is not None:
            capacity = compiled.capacity(capacity)
            pooled = compiled.pool.get(slot)
            if pooled is not None and pooled.capacity >= capacity:
                self.capacity, self.cache, self.positions = (
                    pooled.capacity,
                    pooled.cache,
                    pooled.positions,
                )
                self.cache.length = 0
                return
        self.capacity = capacity
        device = next(model.parameters()).device
        cfg = model.config.get_text_config(decoder=True)
        self.cache = PointerCache(cfg.num_hidden_layers, capacity)
        self.positions = torch.arange(capacity, device=device)
        if compiled is not None:
            compiled.pool[slot] = self

    @property
    def length(self) -> int:
        return self.cache.length

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Feed 1-D ids after what the cache holds; returns logits (len(ids) or 1, V)."""
        return self.forward_states(ids, (), last_only)[0]

    def forward_states(
        self, ids: torch.Tensor, layers: tuple[int, ...], last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward, and the hidden states of `layers` at every fed position (None: none)."""
        start, n = self.cache.length, ids.numel()
        if start + n > self.capacity:
            raise RuntimeError(f"static KV cache overflow: {start} + {n} > {self.capacity}")
        pos = self.positions[start : start + n]
        self.cache.write_at = pos
        if last_only:  # prefill: lengths vary, so never compiled
            out = forward_step(self.model, self.cache, ids, pos, self.positions, 1, layers)
        else:
            out = self.step(self.model, self.cache, ids, pos, self.positions, 0, layers)
        self.cache.length = start + n
        return out

    def rollback(self, n_tokens: int) -> None:
        """Forget everything after the first n_tokens positions (no-op if it holds fewer)."""
        self.cache.length = min(self.cache.length, n_tokens)

    def nbytes(self) -> int:
        return _layer_bytes(self.cache)


class DynamicKV:
    """transformers' DynamicCache: grows by concatenation, rolls back with crop."""

    path = "dynamic"

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return self.forward_states(ids, (), last_only)[0]

    def forward_states(
        self, ids: torch.Tensor, layers: tuple[int, ...], last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(
            input_ids=ids.view(1, -1),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
            output_hidden_states=bool(layers),
        )
        return out.logits[0], hidden_states(out, layers)

    def rollback(self, n_tokens: int) -> None:
        extra = self.cache.get_seq_length() - n_tokens
        if extra > 0:
            self.cache.crop(-extra)

    def nbytes(self) -> int:
        return _layer_bytes(self.cache)


KV = StaticKV | DynamicKV


def new_kv(model, capacity: int, compiled: Compiled | None = None, slot: str = "target") -> KV:
    """The static cache when the model allows it, else the dynamic one (never compiled).

    slot names the cache's user ("target", "draft"): a model drafting for itself needs two.
    """
    if static_supported(model) is None:
        return StaticKV(model, capacity, compiled, slot)
    return DynamicKV(model)


def _layer_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total

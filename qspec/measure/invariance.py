"""Batch invariance of a target variant, and where a greedy mismatch comes from.

Greedy speculative output equals target-only output only if one k-token forward (the
verify step) picks the same argmax as k one-token forwards over the same positions (plain
decoding). Quantized matmuls can break this: LLM.int8's outlier columns are chosen from
every row of the batch, so a row's result depends on its neighbours. We measure it per
variant, through the engine's own KV cache path (qspec.engine.kv.new_kv), instead of assuming it.
"""

from __future__ import annotations

import torch

from qspec.engine.kv import new_kv
from qspec.records import Divergence, Invariance

PREFIX = 16  # tokens prefilled before the compared positions; identical in both paths


def _margin(logits: torch.Tensor) -> torch.Tensor:
    """top-1 minus top-2 logit per row: how far an argmax is from flipping."""
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@torch.inference_mode()
def batch_invariance(model, ids: torch.Tensor, k: int, *, max_positions: int = 256) -> Invariance:
    """Compare one-token decoding with k-token forwards over the same positions of `ids`.

    Both paths prefill the same prefix through a fresh cache from new_kv (as the engine's
    target), then feed the same next tokens: path (a) one per forward, path (b) k per
    forward, so each path's cache after the prefix is built from its own forward shapes,
    as in plain and speculative decoding. batch_invariant is "argmax never flips": the
    engine's greedy losslessness needs argmax equality only, and fp32 logits differ by
    ~1e-5 between shapes from matmul kernel choice alone; max_abs_logit_diff is beside it.
    max_flip_margin is the largest top-1/top-2 margin (path a) at a flip: a small one
    means flips only at near-ties, a large one a real fault.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    ids = ids.view(-1)
    prefix = min(PREFIX, max(ids.numel() - k, 1))
    n = min(max_positions, ids.numel() - prefix) // k * k
    if n < k:
        raise ValueError(f"need at least {prefix + k} tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    ids = ids[: prefix + n].to(device)
    one, many = new_kv(model, prefix + n), new_kv(model, prefix + n)
    one.forward(ids[:prefix], last_only=True)
    many.forward(ids[:prefix], last_only=True)
    max_diff, flips, flip_margin = 0.0, 0, None
    for start in range(prefix, prefix + n, k):
        chunk = ids[start : start + k]
        a = torch.cat([one.forward(chunk[i : i + 1]) for i in range(k)]).float()
        b = many.forward(chunk).float()
        max_diff = max(max_diff, (a - b).abs().max().item())
        flipped = a.argmax(-1) != b.argmax(-1)
        if flipped.any():
            flips += int(flipped.sum())
            worst = _margin(a[flipped]).max().item()
            flip_margin = worst if flip_margin is None else max(flip_margin, worst)
    return Invariance(
        positions=n,
        k=k,
        max_abs_logit_diff=max_diff,
        argmax_flips=flips,
        argmax_flips_per_1000=1000 * flips / n,
        max_flip_margin=flip_margin,
        batch_invariant=flips == 0,
        method=(
            f"teacher-forced logits at {n} positions after a {prefix}-token prefill, one token "
            f"per forward vs {k} tokens per forward, each through its own engine KV cache; "
            "invariant = argmax never flips"
        ),
    )


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def divergence(
    target_tokens: list[int],
    speculative_tokens: list[int],
    model,
    prompt: torch.Tensor,
    id: str = "",
) -> Divergence | None:
    """Where greedy speculative output first leaves target-only output, and how close a call
    the target's own choice was there, so a near-tie is told apart from a real fault.

    One teacher-forced forward of prompt + target_tokens[:i] through the engine's cache path
    gives the target's logits at generated position i. None when the outputs are equal; a
    token is None where its output has already ended.
    """
    i = first_mismatch(target_tokens, speculative_tokens)
    if i is None:
        return None
    prompt = prompt.view(-1)
    ctx = torch.tensor(target_tokens[:i], dtype=prompt.dtype, device=prompt.device)
    ctx = torch.cat([prompt, ctx]).to(next(model.parameters()).device)
    logits = new_kv(model, ctx.numel()).forward(ctx, last_only=True)[-1].float()
    spec = speculative_tokens[i] if i < len(speculative_tokens) else None
    return Divergence(
        id=id,
        position=i,
        target_token=target_tokens[i] if i < len(target_tokens) else None,
        speculative_token=spec,
        top1_top2_margin=_margin(logits).item(),
        # how far below the target's top-1 the speculative token was (== margin when top-2)
        speculative_gap=(logits.max() - logits[spec]).item() if spec is not None else None,
    )

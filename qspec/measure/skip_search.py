"""The layers a skip-search draft leaves out, chosen by predicted speedup on suite text (in the
spirit of Draft & Verify's offline search; a greedy search here, not their Bayesian one)."""

from __future__ import annotations

import statistics
import time

import torch

from qspec.engine.kv import new_kv
from qspec.engine.layerskip import LayerSkip, decoder_layers
from qspec.engine.loop import sync
from qspec.measure.acceptance import expected_tau

MIN_ALPHA = 0.3  # the search stops removing layers once agreement falls below this


@torch.inference_mode()
def _step_seconds(model, ids: torch.Tensor, width: int, repeats: int = 5) -> float:
    """Median time of one forward of `width` tokens after a short prefix, through the engine's cache."""
    kv = new_kv(model, ids.numel() + width + 1)
    kv.forward(ids[:-width], last_only=True)
    times = []
    for _ in range(repeats + 1):
        kv.rollback(ids.numel() - width)
        sync(ids.device)
        t = time.perf_counter()
        kv.forward(ids[-width:])
        sync(ids.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


@torch.inference_mode()
def search_skip(model, ids: torch.Tensor, gamma: int, max_skipped: int | None = None) -> dict:
    """Pick the layers to skip by predicted speedup on this text, in the spirit of Draft &
    Verify's offline search (a greedy search here, not their Bayesian one).

    Each round removes the layer whose removal keeps the teacher-forced top-1 agreement
    (alpha) with the full model highest, then measures the one-token step time of that
    draft against the full model's (c); with v = a (gamma+1)-token verify / a one-token step,
    the predicted speedup is tau(alpha, gamma) / (gamma c + v). The best round wins.
    """
    n_layers = len(decoder_layers(model))
    max_skipped = n_layers // 2 if max_skipped is None else max_skipped
    full = model(input_ids=ids.view(1, -1), use_cache=False).logits[0].argmax(-1)
    base = _step_seconds(model, ids[:64], 1)
    v = _step_seconds(model, ids[:64], gamma + 1) / base

    def agreement(skip: tuple[int, ...]) -> float:
        logits = LayerSkip(model, skip)(input_ids=ids.view(1, -1), use_cache=False).logits[0]
        return float((logits.argmax(-1) == full).float().mean())

    skip: tuple[int, ...] = ()
    rows = []
    while len(skip) < min(max_skipped, n_layers - 1):
        options = [tuple(sorted((*skip, i))) for i in range(n_layers) if i not in skip]
        alpha, skip = max((agreement(o), o) for o in options)
        if alpha < MIN_ALPHA:
            break
        c = _step_seconds(LayerSkip(model, skip), ids[:64], 1) / base
        speedup = expected_tau(alpha, gamma) / (gamma * c + v)
        rows.append(
            {"skip": list(skip), "alpha": alpha, "cost_ratio": c, "speedup_predicted": speedup}
        )
    best = max(rows, key=lambda r: r["speedup_predicted"], default=None)
    return {
        "skip": best["skip"] if best else [],
        "alpha": best["alpha"] if best else None,
        "speedup_predicted": best["speedup_predicted"] if best else None,
        "verify_cost_ratio": v,
        "positions": ids.numel() - 1,
        "rounds": rows,
    }

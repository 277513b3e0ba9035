"""Layer-skip self-drafting: the target's own weights with some decoder layers left out.

No second model is loaded: a LayerSkip wraps a built model and, for its own forwards only,
swaps the decoder's layer list for the kept layers. Each kept layer keeps its index, so the
draft's KV cache (kv.py) fills only the slots of the layers it runs. In the spirit of SWIFT
and Draft & Verify (Zhang et al. 2024), which skip intermediate layers of the target.

Drafter names (config [draft] precisions):
    skip-50%          the cell's target variant, half of its middle layers skipped, evenly spaced
    skip:3,5,7        the cell's target variant, the listed layers skipped
    skip-search       the skip fraction chosen on the suite corpus (search_skip)
    nf4+skip-50%      the draft model's nf4 variant with layers skipped (any precision works)
"""

from __future__ import annotations

import torch

from qspec.models.precisions import SkipName, parse_skip  # noqa: F401 - the names live there


def middle_layers(n_layers: int, fraction: float) -> tuple[int, ...]:
    """round(fraction * n_layers) layers evenly spaced between the first and the last,
    which are always kept (they map embeddings in and hidden states out)."""
    middle = list(range(1, n_layers - 1))
    count = min(len(middle), round(fraction * n_layers))
    if count <= 0:
        return ()
    if count == 1:
        return (middle[len(middle) // 2],)
    step = (len(middle) - 1) / (count - 1)
    return tuple(middle[round(i * step)] for i in range(count))


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


class LayerSkip(torch.nn.Module):
    """A built causal LM whose forwards run only the layers not in `skip`."""

    def __init__(self, model, skip: tuple[int, ...]):
        super().__init__()
        layers = decoder_layers(model)
        bad = [i for i in skip if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist (the model has {len(layers)})")
        if len(set(skip)) >= len(layers):
            raise ValueError("a layer-skip draft must keep at least one layer")
        self.base = model
        self.skip = tuple(sorted(set(skip)))
        self._full = layers
        self._kept = torch.nn.ModuleList(
            [layer for i, layer in enumerate(layers) if i not in self.skip]
        )

    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    def forward(self, **kwargs):
        decoder = self.base.get_decoder()
        decoder.layers = self._kept
        try:
            return self.base(**kwargs)
        finally:
            decoder.layers = self._full


MIN_ALPHA = 0.3  # the search stops removing layers once agreement falls below this


@torch.inference_mode()
def _step_seconds(model, ids: torch.Tensor, width: int, repeats: int = 5) -> float:
    """Median time of one forward of `width` tokens after a short prefix, through the engine's cache."""
    import statistics
    import time

    from qspec.engine.kv import new_kv
    from qspec.engine.loop import sync

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
    from qspec.measure.acceptance import expected_tau

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

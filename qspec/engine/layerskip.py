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

measure/skip_search.py picks the layers for skip-search.
"""

from __future__ import annotations

import torch


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

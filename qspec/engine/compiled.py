"""torch.compile of one model's forward through the static KV cache, and the caches whose
addresses its graphs captured.

The caller decides to compile (the qspec backend, from the config) and makes one Compiled per
model for the whole run: every generation of every cell then replays the graphs already
compiled and captured (same shapes, same cache addresses), and nothing is kept in module
globals. On CUDA "reduce-overhead" mode captures CUDA graphs (the KV tensors have static
addresses, marked by transformers' StaticLayer); on CPU it is plain inductor.
"""

from __future__ import annotations

import torch

from qspec.engine.pointer_cache import forward_step

CAPACITY_STEP = 256  # compiled caches grow in steps, so prompts of other lengths share graphs
# one graph per input length and cache size: a gamma sweep needs more than torch's default 8
RECOMPILE_LIMIT = 64


class Compiled:
    """The compiled one-forward step of one model, and its pooled caches per slot."""

    def __init__(self, model: torch.nn.Module):
        cuda = next(model.parameters()).device.type == "cuda"
        self._step = torch.compile(
            forward_step, mode="reduce-overhead" if cuda else "default", dynamic=False
        )
        self.pool: dict[str, object] = {}  # slot ("target", "draft") -> its StaticKV

    def step(self, *args, **kwargs) -> torch.Tensor:
        """The compiled forward, under this object's recompile limit (dynamo's setting is
        process-wide: patched for these calls only, never left changed)."""
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._step(*args, **kwargs)

    @staticmethod
    def capacity(n: int) -> int:
        return -(-n // CAPACITY_STEP) * CAPACITY_STEP

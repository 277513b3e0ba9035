"""What every backend returns, so the generation stage measures them all the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qspec.engine.loop import Generation
from qspec.measure.speedup import Timing


@dataclass
class Timed:
    """One timed generation of one prompt: what the figures need, from any backend."""

    prompt: int  # index into the group's prompts
    repeat: int
    tokens: list[int]
    total_s: float
    gen: Generation | None = None  # qspec's engine record (steps, prefill); None for a peer
    memory_rise: int = 0  # bytes above what was resident when it started

    @property
    def timing(self) -> Timing:
        prefill = self.gen.prefill_s if self.gen is not None else None
        return Timing(self.prompt, self.repeat, len(self.tokens), self.total_s, prefill)


@dataclass
class Prepared:
    """A cell set up to run: run(prompt index, repeat) -> Timed, and how the engine was set up."""

    run: Callable[[int, int], Timed]
    compile: bool = False
    compile_s: float | None = None  # the first warm-up, compilation included
    compile_error: str | None = None  # why a compile = true cell was measured eagerly
    capacity: int = 0  # the KV caches' size in positions, the same for every prompt

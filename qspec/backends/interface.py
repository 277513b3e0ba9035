"""What every backend returns, so the generation stage measures them all the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from qspec.engine.loop import Generation, Step
from qspec.measure.speedup import Timing


@dataclass
class Counted:
    """A peer's steps, counted from outside its loop: what acceptance needs (drafted, accepted
    and emitted per step, in target tokens), and the tokens its draft model decoded in its own
    vocabulary (more or fewer than it proposed, when the tokenizers differ)."""

    steps: list[Step] = field(default_factory=list)
    draft_model_tokens: int = 0
    # sampled: at each tested draft position, sum_x min(p(x), q(x)) of the very p and q the
    # acceptance test used, which is that position's acceptance probability if the test is exact
    overlaps: list[float] = field(default_factory=list)


@dataclass
class Timed:
    """One timed generation of one prompt: what the figures need, from any backend."""

    prompt: int  # index into the group's prompts
    repeat: int
    tokens: list[int]
    total_s: float
    gen: Generation | None = None  # qspec's engine record (steps, prefill); None for a peer
    memory_rise: int = 0  # bytes above what was resident when it started
    counted: Counted | None = None  # a peer's steps, where it can be counted
    memory_reset: bool = True  # the high-water mark was restarted before it (memory.py)

    @property
    def steps(self) -> list[Step]:
        """The steps acceptance is measured on, from the engine or counted from a peer."""
        if self.gen is not None:
            return self.gen.steps
        return self.counted.steps if self.counted is not None else []

    @property
    def draft_model_tokens(self) -> int:
        if self.gen is not None:
            return self.gen.draft_model_tokens
        return self.counted.draft_model_tokens if self.counted is not None else 0

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

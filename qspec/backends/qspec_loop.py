"""qspec's own speculative loop as a backend: target-only and speculative cells.

Compiling is decided here, from the config: one Compiled per model for the whole run (the
context keeps them), so every cell of a target replays graphs compiled once. A model that
torch.compile cannot handle (a quantization kernel it cannot trace, say) is measured eagerly
instead, and the record says why.
"""

from __future__ import annotations

import logging
import time

import torch

from qspec.backends.interface import Prepared, Timed
from qspec.engine.draft_length import DraftLength
from qspec.engine.loop import generate
from qspec.suites.encoding import stop_ids

log = logging.getLogger("qspec")

WARMUP_TOKENS = 8


def run_capacity(cfg, prompts) -> int:
    """One cache size for every cell of a run and every prompt, the warm-up included: compiled
    shapes never change, and a target-only cell attends over the same masked cache length as
    a speculative one. A longer cache sums attention in another order: 2e-5 of a logit in
    fp32, but up to 0.25 through bitsandbytes nf4 on an AVX-512 CPU, enough to flip near-ties
    and make greedy speculative output differ from the target's own for that alone."""
    widest = max(
        DraftLength(kind, gamma, cfg.confidence_threshold).widest
        for kind in cfg.draft_lengths
        for gamma in cfg.gammas
    )
    return max(p.ids.numel() + p.max_new_tokens for p in prompts) + widest + 1


def prepare(ctx, cell, target, drafter, prompts) -> Prepared:
    cfg = ctx.cfg
    length = DraftLength(cell.draft_length, cell.gamma, cfg.confidence_threshold)
    capacity = run_capacity(cfg, prompts)
    prepared = Prepared(run=None, compile=bool(cfg.compile), capacity=capacity)
    run = dict(
        drafter=drafter,
        length=length,
        sampler=ctx.sampler(cell.mode),
        eos_ids=stop_ids(ctx.models.tokenizer, target),
        capacity=capacity,
    )
    _compile(ctx, run, drafter, target, prepared.compile)
    first = prompts[0]
    for w in range(max(cfg.warmup, 1 if prepared.compile else 0)):
        t = time.perf_counter()
        try:
            generate(
                target, first.ids, max_new_tokens=min(WARMUP_TOKENS, first.max_new_tokens), **run
            )
        except Exception as err:  # noqa: BLE001
            if not prepared.compile:
                raise
            prepared.compile_error = f"{type(err).__name__}: {err}"[:500]
            log.warning("torch.compile failed for %s; measuring eagerly: %s", cell, err)
            prepared.compile = False
            _compile(ctx, run, drafter, target, False)
        if w == 0 and prepared.compile:
            prepared.compile_s = time.perf_counter() - t  # compilation included

    def one(i: int, repeat: int) -> Timed:
        p = prompts[i]
        rng = torch.Generator(ctx.device).manual_seed(cfg.seed + i)
        resident = ctx.memory.reset()
        g = generate(target, p.ids, max_new_tokens=p.max_new_tokens, generator=rng, **run)
        rise, own = ctx.memory.rise(resident)
        return Timed(i, repeat, g.tokens, g.total_s, g, rise, memory_reset=own)

    prepared.run = one
    return prepared


def _compile(ctx, run: dict, drafter, target, on: bool) -> None:
    """The compiled steps of the target and of a model draft, or eager ones."""
    run["compiled"] = ctx.compiled(target) if on else None
    if drafter is not None and drafter.model is not None:
        drafter.compiled = ctx.compiled(drafter.model) if on else None

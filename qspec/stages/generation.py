"""Stage 3: the generation cells, target-only, speculative and transformers' peer.

Cells that share a suite, a target and a mode form a group, measured interleaved: for each
repeat and each prompt, every cell of the group generates in turn. Drift of the machine
then hits the baseline and the speculative cells alike, and each speedup is a set of
paired per-generation ratios with an interval, not a ratio of two cells timed minutes
apart. Figures per cell are computed in cell_figures.py.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qspec.backends.transformers_peer import hf_assisted
from qspec.engine.layerskip import LayerSkip
from qspec.engine.loop import Generation, generate, max_drafts
from qspec.measure.memory import peak_bytes, reset_peak
from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES, draft_variant
from qspec.plan import Cell, groups, key_of_cell, plan
from qspec.records import GenerationRecord, Kind
from qspec.stages.cell_figures import bare_record, cell_record
from qspec.stages.context import RunContext, Skip
from qspec.suites.encoding import EncodedPrompt, encode_prompts, stop_ids

log = logging.getLogger("qspec")


@dataclass
class Timed:
    """One timed generation of one prompt: what the figures need, engine or transformers."""

    prompt: int  # index into the group's prompts
    repeat: int
    tokens: list[int]
    total_s: float
    gen: Generation | None = None  # the engine's record; None for transformers' peer
    memory_rise: int = 0  # bytes above what was resident when it started


@dataclass
class CellRun:
    """A cell being measured: how to generate one prompt, and what it has measured so far."""

    cell: Cell
    key: str
    run: object = None  # callable(prompt, seed) -> Timed, set up by _prepare
    timed: list[Timed] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    compile: bool = False
    compile_s: float | None = None
    compile_error: str | None = None
    own_weights: int = 0
    draft_skip: list[int] | None = None  # the layers a layer-skip draft leaves out
    capacity: int = 0  # the KV caches' size in positions, the same for every prompt of the cell


def generation_stage(ctx: RunContext, progress) -> Iterator[GenerationRecord]:
    cells = [c for c in plan(ctx.cfg, list(ctx.suites), ctx.device.type) if ctx.works_on(c.target)]
    prompts: dict[str, list[EncodedPrompt]] = {}
    with progress.task("cells", total=len(cells)) as advance:
        for group in groups(cells):
            keys = {c: key_of_cell(c, ctx.cfg, ctx.device.type, ctx.versions) for c in group}
            todo = [c for c in group if ctx.finished.cell(keys[c]) is None]
            for c in group:
                if c not in todo:
                    advance(f"{c.label()} (stored)")
            if not todo:
                continue
            # The baseline is timed again with any cell of its group: a speedup needs a
            # baseline measured in the same stretch of time.
            if group[0].kind == Kind.TARGET_ONLY and group[0] not in todo:
                todo.insert(0, group[0])
            suite = group[0].suite
            if suite not in prompts and "target" not in ctx.models.errors:
                prompts[suite] = encode_prompts(
                    ctx.models.tokenizer,
                    ctx.suites[suite].prompts,
                    ctx.cfg.max_prompts,
                    ctx.cfg.max_new_tokens,
                    ctx.device,
                )
            yield from measure_group(ctx, todo, keys, prompts.get(suite, []), advance)


def build_group_models(ctx: RunContext, target: str) -> None:
    """Build a target variant and every draft variant its cells use, before any is measured
    (a worker of one group does this first, so its measured peak excludes the builds)."""
    ctx.models.build("target", target)
    for name in ctx.cfg.draft.precisions:
        variant = draft_variant(name)
        if variant is not None:
            ctx.models.build("draft", variant)


def measure_group(ctx: RunContext, cells: list[Cell], keys, prompts, advance):
    runs = [CellRun(c, keys[c]) for c in cells]
    for r in runs:
        advance(r.cell.label())
        _guarded(r, _prepare, ctx, r, prompts)
    for repeat in range(ctx.cfg.repeats):  # same seeds each pass: same outputs, more samples
        for i in range(len(prompts)):
            for r in runs:
                if r.status == "ok":
                    _guarded(r, lambda r, i, repeat: r.timed.append(r.run(i, repeat)), r, i, repeat)
    base = runs[0] if runs[0].cell.kind == Kind.TARGET_ONLY else None
    spec = {
        (r.cell.draft, r.cell.gamma): r
        for r in runs
        if r.cell.kind == Kind.SPECULATIVE and r.cell.draft_length == "fixed"
    }
    for r in runs:
        peer = spec.get((r.cell.draft, r.cell.gamma)) if r.cell.kind == Kind.HF_ASSISTED else None
        try:
            rec = cell_record(ctx, r, prompts, base, peer)
        except Exception as err:  # noqa: BLE001 - a fault in one cell never loses the others
            log.debug(traceback.format_exc())
            rec = bare_record(ctx, r, "failed", f"{type(err).__name__}: {err}")
        yield rec
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _guarded(r: CellRun, work, *args) -> None:
    """Run one piece of a cell's work; a fault marks that cell, never the group."""
    try:
        work(*args)
    except Skip as skip:
        r.status, r.error = skip.status, skip.reason
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        r.status, r.error = "failed", f"out of memory: {err}"
    except Exception as err:  # noqa: BLE001
        log.debug(traceback.format_exc())
        r.status, r.error = "failed", f"{type(err).__name__}: {err}"
    if r.status != "ok":
        r.timed.clear()


def _prepare(ctx: RunContext, r: CellRun, prompts: list[EncodedPrompt]) -> None:
    """Load the cell's models and drafter, warm up (compiling if asked), set r.run."""
    cell = r.cell
    if ctx.fault is not None:
        ctx.fault(cell)
    target = ctx.models.model("target", cell.target)
    if not prompts:
        raise Skip("unavailable", f"suite {cell.suite!r} declares no prompts")
    drafter = ctx.models.drafter(cell.draft, cell.target) if cell.draft is not None else None
    r.own_weights = ctx.models.build("target", cell.target).weights_bytes or 0
    own_draft = draft_variant(cell.draft) if cell.draft is not None else None
    if own_draft is not None:  # a layer-skip draft of the target itself adds no weights
        r.own_weights += ctx.models.build("draft", own_draft).weights_bytes or 0
    if isinstance(getattr(drafter, "model", None), LayerSkip):
        r.draft_skip = list(drafter.model.skip)
        if cell.kind == Kind.HF_ASSISTED:
            raise Skip("unavailable", "transformers' assisted generation has no layer-skip draft")
    if cell.kind == Kind.HF_ASSISTED:
        r.run = _hf_runner(ctx, cell, target, drafter, prompts)
    else:
        r.run = _engine_runner(ctx, r, target, drafter, prompts)


def _engine_runner(ctx: RunContext, r: CellRun, target, drafter, prompts):
    cell, cfg = r.cell, ctx.cfg
    r.compile = bool(cfg.compile)
    # one cache size for every prompt, the warm-up included: compiled shapes never change
    widest = max_drafts(cell.draft_length, cell.gamma)
    capacity = max(p.ids.numel() + p.max_new_tokens for p in prompts) + widest + 1
    r.capacity = capacity
    run = dict(
        drafter=drafter,
        gamma=cell.gamma,
        sampler=ctx.sampler(cell.mode),
        eos_ids=stop_ids(ctx.models.tokenizer, target),
        compile=r.compile,
        capacity=capacity,
        draft_length=cell.draft_length,
        threshold=cfg.confidence_threshold,
    )
    # Compilation happens in the first warm-up; it is timed here and never counted as latency.
    # A model torch.compile cannot handle (a quantization kernel it cannot trace, say) is
    # measured eagerly instead, and the record says why.
    first = prompts[0]
    for w in range(max(cfg.warmup, 1 if r.compile else 0)):
        t = time.perf_counter()
        try:
            generate(target, first.ids, max_new_tokens=min(8, first.max_new_tokens), **run)
        except Exception as err:  # noqa: BLE001
            if not run["compile"]:
                raise
            r.compile_error = f"{type(err).__name__}: {err}"[:500]
            log.warning("torch.compile failed for %s; measuring eagerly: %s", cell, err)
            r.compile = run["compile"] = False
        if w == 0 and r.compile:
            r.compile_s = time.perf_counter() - t  # the first warm-up, compilation included

    def one(i: int, repeat: int) -> Timed:
        p = prompts[i]
        rng = torch.Generator(ctx.device).manual_seed(cfg.seed + i)
        resident = reset_peak(ctx.device)
        g = generate(target, p.ids, max_new_tokens=p.max_new_tokens, generator=rng, **run)
        rise = peak_bytes(ctx.device)[0] - resident
        return Timed(i, repeat, g.tokens, g.total_s, g, max(rise, 0))

    return one


def _hf_runner(ctx: RunContext, cell: Cell, target, drafter, prompts):
    """transformers' assisted generation for the same pair, as a timing peer."""
    draft_model = getattr(drafter, "model", None)
    if draft_model is None and cell.draft not in MODEL_FREE_DRAFTER_NAMES:
        raise Skip("unavailable", "no draft model")
    tokenizer = ctx.models.tokenizer
    eos = stop_ids(tokenizer, target)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    run = dict(
        draft_model=draft_model,
        gamma=cell.gamma,
        sampler=ctx.sampler(cell.mode),
        eos_ids=eos,
        pad_id=pad,
    )
    first = prompts[0]
    for _ in range(ctx.cfg.warmup):
        hf_assisted(target, first.ids, max_new_tokens=min(8, first.max_new_tokens), seed=0, **run)

    def one(i: int, repeat: int) -> Timed:
        p = prompts[i]
        resident = reset_peak(ctx.device)
        toks, secs = hf_assisted(
            target, p.ids, max_new_tokens=p.max_new_tokens, seed=ctx.cfg.seed + i, **run
        )
        rise = peak_bytes(ctx.device)[0] - resident
        return Timed(i, repeat, toks, secs, None, max(rise, 0))

    return one

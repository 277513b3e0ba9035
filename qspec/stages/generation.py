"""Stage 3: the generation cells, target-only, speculative and transformers' peer (its own
plain generate, and assisted generation).

Cells that share a suite, a target and a mode form a group, measured interleaved: for each
repeat and each prompt, every cell of the group generates in turn. Drift of the machine
then hits the baseline and the speculative cells alike, and each speedup is a set of
paired per-generation ratios with an interval, not a ratio of two cells timed minutes
apart. Figures per cell are computed in cell_figures.py.
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qspec.backends import qspec_loop, transformers_peer
from qspec.backends.interface import Prepared, Timed
from qspec.engine.cross_tokenizer import CrossTokenizerDrafter
from qspec.engine.layerskip import LayerSkip
from qspec.keys import key_of_cell
from qspec.models.precisions import drafter_variant, head_kind
from qspec.plan import (
    SAME_HEAD,
    SELF_DRAFT,
    Cell,
    drafts_for_itself,
    group_variants,
    groups,
    plan,
    repeats_reference_head,
)
from qspec.records import GenerationRecord, Kind, Skip
from qspec.stages.cell_figures import bare_record, cell_record
from qspec.stages.context import RunContext
from qspec.suites.encoding import EncodedPrompt, encode_prompts

log = logging.getLogger("qspec")

# cell kind -> the backend that runs it: prepare(ctx, cell, target, drafter, prompts) -> Prepared
BACKENDS = {
    Kind.TARGET_ONLY: qspec_loop.prepare,
    Kind.SPECULATIVE: qspec_loop.prepare,
    Kind.HF_TARGET_ONLY: transformers_peer.prepare,
    Kind.HF_ASSISTED: transformers_peer.prepare,
}


@dataclass
class CellRun:
    """A cell being measured: its backend set up, and what it has measured so far."""

    cell: Cell
    key: str
    prepared: Prepared | None = None
    timed: list[Timed] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    own_weights: int = 0
    draft_skip: list[int] | None = None  # the layers a layer-skip draft leaves out
    cross_tokenizer: dict | None = None  # a draft with another tokenizer: its vocabulary map


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
            # Each baseline is timed again with any cell of its group that it measures: a
            # speedup needs a baseline measured in the same stretch of time.
            todo = with_baselines(group, todo)
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


def with_baselines(group: list[Cell], todo: list[Cell]) -> list[Cell]:
    """The cells to measure, with the baselines they are paired with: qspec's target-only
    cell for any cell to measure, transformers' plain generate for its assisted cells."""
    assisted = any(c.kind == Kind.HF_ASSISTED for c in todo)
    base = {Kind.TARGET_ONLY: True, Kind.HF_TARGET_ONLY: assisted}
    return [c for c in group if c in todo or base.get(c.kind, False)]


def build_group_models(ctx: RunContext, target: str) -> None:
    """Build a target variant and every draft variant its cells use, before any is measured
    (a worker of one group does this first, so its measured peak excludes the builds)."""
    for role, precision in group_variants(ctx.cfg, target):
        ctx.models.build(role, precision)


def measure_group(ctx: RunContext, cells: list[Cell], keys, prompts, advance):
    runs = [CellRun(c, keys[c]) for c in cells]
    for r in runs:
        advance(r.cell.label())
        _guarded(r, _prepare, ctx, r, prompts)
    for repeat in range(ctx.cfg.repeats):  # same seeds each pass: same outputs, more samples
        for i in range(len(prompts)):
            for r in runs:
                if r.status == "ok":
                    _guarded(r, _measure, r, i, repeat)
    base = next((r for r in runs if r.cell.kind == Kind.TARGET_ONLY), None)
    hf_base = next((r for r in runs if r.cell.kind == Kind.HF_TARGET_ONLY), None)
    # qspec's run of the same pairing, which each peer cell is compared with
    qspec_runs = {
        (r.cell.draft, r.cell.gamma): r
        for r in runs
        if r.cell.kind in (Kind.TARGET_ONLY, Kind.SPECULATIVE) and r.cell.draft_length == "fixed"
    }
    for r in runs:
        hf = r.cell.kind in (Kind.HF_TARGET_ONLY, Kind.HF_ASSISTED)
        peer = qspec_runs.get((r.cell.draft, r.cell.gamma)) if hf else None
        # a peer's speedup and lossless check are against its own loop's target alone
        own_base = hf_base if r.cell.kind == Kind.HF_ASSISTED else None if hf else base
        try:
            rec = cell_record(ctx, r, prompts, own_base, peer)
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


def _measure(r: CellRun, i: int, repeat: int) -> None:
    r.timed.append(r.prepared.run(i, repeat))


def _prepare(ctx: RunContext, r: CellRun, prompts: list[EncodedPrompt]) -> None:
    """Load the cell's models and drafter and set up its backend (warm-up, compile)."""
    cell = r.cell
    if ctx.fault is not None:
        ctx.fault(cell)
    if drafts_for_itself(ctx.cfg, cell.target, cell.draft):
        raise Skip("unavailable", SELF_DRAFT)
    if repeats_reference_head(ctx.cfg, cell.target, cell.draft, ctx.device.type):
        raise Skip("unavailable", SAME_HEAD)
    if cell.kind == Kind.HF_ASSISTED and head_kind(cell.draft) is not None:
        raise Skip("unavailable", "transformers' assisted generation has no EAGLE head drafter")
    target = ctx.models.model("target", cell.target)
    if not prompts:
        raise Skip("unavailable", f"suite {cell.suite!r} declares no prompts")
    drafter = ctx.models.drafter(cell.draft, cell.target) if cell.draft is not None else None
    r.own_weights = ctx.models.build("target", cell.target).weights_bytes or 0
    own_draft = drafter_variant(cell.draft) if cell.draft is not None else None
    draft_built = ctx.models.build(*own_draft) if own_draft is not None else None
    # a layer-skip draft of the target, or the target's own variant drafting, adds no weights
    if draft_built is not None and draft_built.model is not target:
        r.own_weights += draft_built.weights_bytes or 0
    if drafter is not None and drafter.target_layers:  # a head: its own weights, not the shared
        r.own_weights += sum(  # embedding or LM head rows it reads from the target
            p.numel() * p.element_size() for p in drafter.model.parameters()
        )
    if drafter is not None and isinstance(drafter.model, LayerSkip):
        r.draft_skip = list(drafter.model.skip)
        if cell.kind == Kind.HF_ASSISTED:
            raise Skip("unavailable", "transformers' assisted generation has no layer-skip draft")
    if isinstance(drafter, CrossTokenizerDrafter):
        r.cross_tokenizer = drafter.vocab.summary()
    r.prepared = BACKENDS[cell.kind](ctx, cell, target, drafter, prompts)

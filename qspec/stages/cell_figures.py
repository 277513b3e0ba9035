"""The record of one measured cell, assembled from typed measurements: Acceptance and Latency
of its steps, paired speedups, the lossless check, memory and predictions.

Acceptance and outputs come from the first repeat (every repeat uses the same seeds, so
the same tokens); timings come from every repeat. Speedups are paired (measure/speedup.py):
each generation of a cell is divided by the baseline's generation of the same prompt and
repeat, measured moments apart (generation.py interleaves them).
"""

from __future__ import annotations

import logging

import torch

from qspec.engine.draft_length import DraftLength
from qspec.measure.acceptance import Acceptance, exactness, expected_acceptance_rate
from qspec.measure.cost_model import CostModel, mean_step_s, oracle_fields
from qspec.measure.latency import Latency
from qspec.measure.memory import cell_measure
from qspec.measure.prediction import (
    Prediction,
    Replay,
    head_odds,
    on_policy_betas,
    replay_greedy,
    sampled_odds,
    steps_vary,
)
from qspec.measure.roofline import roofline
from qspec.measure.speedup import paired_fields
from qspec.measure.stats import spread_of
from qspec.measure.step_odds import Expected, expected_run
from qspec.models.precisions import head_kind
from qspec.records import GenerationRecord, Kind, Output
from qspec.records.base import PEER_KINDS

log = logging.getLogger("qspec")


def cell_record(ctx, r, prompts, base, peer) -> GenerationRecord:
    """The record of CellRun r; base is the target-only run it is compared with (qspec's loop
    alone for qspec's cells, transformers' plain generate for its assisted cells), peer (for
    transformers' cells) qspec's run of the same draft and gamma (its target alone for
    transformers' plain generate)."""
    c = r.cell
    if r.status != "ok":
        return bare_record(ctx, r, r.status, r.error)
    first = _first_pass(r)
    steps = [s for t in r.timed for s in t.steps]  # every repeat
    measured = Acceptance.of([s for t in first for s in t.steps], _width(c))
    invariance = ctx.invariance.get((ctx.models.target_ref.ref, c.target))
    fields = {
        **_coordinates(ctx, r),
        "n_prompts": len(prompts),
        "repeats": ctx.cfg.repeats,
        "draft_skip": r.draft_skip,
        "cross_tokenizer": _cross_tokenizer(r, first),
        "target_batch_invariant": invariance.batch_invariant if invariance else None,
        **_memory(ctx, r),
        **(_engine_figures(ctx, r, measured, steps) if c.kind not in PEER_KINDS else {}),
        **(_peer_figures(r, measured) if c.kind in PEER_KINDS else {}),
        "outputs": _outputs(ctx, r, prompts),
    }
    baseline_ok = base is not None and base.status == "ok"
    if c.kind not in (Kind.TARGET_ONLY, Kind.HF_TARGET_ONLY) and baseline_ok:
        fields.update(paired_fields(_timings(r), _timings(base), "speedup"))
        if c.mode == "greedy":
            fields.update(_lossless(ctx, r, base, prompts))
    if peer is not None and peer.status == "ok":
        fields.update(paired_fields(_timings(peer), _timings(r), "qspec_over_hf"))
    if c.kind == Kind.SPECULATIVE:
        drafting = [s for s in steps if s.drafted]
        fields["mean_drafted"] = (
            sum(s.drafted for s in drafting) / len(drafting) if drafting else None
        )
        fields.update(_predicted(ctx, r, prompts, measured, base if baseline_ok else None, steps))
    price = ctx.cfg.price_per_device_hour
    if price is not None and fields.get("tokens_per_s"):
        fields["usd_per_million_tokens"] = price / 3600 / fields["tokens_per_s"] * 1e6
        fields["price_per_device_hour"] = price
    return GenerationRecord(**fields)


def _width(cell) -> int:
    """The most drafts a step of this cell can hold: gamma, or 2 gamma on the heuristic
    schedule, so its histogram and per-position rates reach every draft it made."""
    return DraftLength(cell.draft_length, cell.gamma).widest


def _cross_tokenizer(r, first) -> dict | None:
    """The vocabulary map and draft-model tokens decoded per target token drafted."""
    if r.cross_tokenizer is None:
        return None
    drafted = sum(s.drafted for t in first for s in t.steps)
    run = sum(t.draft_model_tokens for t in first)
    per = run / drafted if drafted and run else None
    return {**r.cross_tokenizer, "draft_tokens_per_target_token": per}


def _coordinates(ctx, r) -> dict:
    return dict(
        key=r.key,
        **r.cell.coordinates(),
        reference=ctx.reference,
        hardware=ctx.hardware_label,
    )


def bare_record(ctx, r, status: str, error: str | None) -> GenerationRecord:
    """A cell's record with its coordinates and status, before any figure."""
    return GenerationRecord(**_coordinates(ctx, r), status=status, error=error)


def _first_pass(r) -> list:
    return [t for t in r.timed if t.repeat == 0]


def _timings(r) -> list:
    return [t.timing for t in r.timed]


def _memory(ctx, r) -> dict:
    rise = max((t.memory_rise for t in r.timed), default=0)
    reset = all(t.memory_reset for t in r.timed)
    f = {
        "peak_memory_bytes": r.own_weights + rise,
        "peak_memory_measure": cell_measure(ctx.device, reset),
        "peak_memory_reset": reset,
        "memory_rise_bytes": rise,
    }
    if ctx.targets is not None:  # a process of this target's group alone: its peak is the group's
        f["group_peak_memory_bytes"], f["group_peak_memory_measure"] = ctx.memory.process_peak()
    return f


def _engine_figures(ctx, r, measured: Acceptance, steps) -> dict:
    c, p = r.cell, r.prepared
    gens = [t.gen for t in _first_pass(r)]
    per_prompt = [Acceptance.of(g.steps, _width(c)) for g in gens]
    weights = ctx.models.build("target", c.target).weights_bytes
    if c.kind == Kind.TARGET_ONLY:
        timed = [s.draft_s + s.verify_s for s in steps]
        line = roofline("decode", weights, timed, ctx.bandwidth)
    else:
        line = roofline("verify", weights, [s.verify_s for s in steps if s.drafted], ctx.bandwidth)
    return {
        **measured.fields(),
        **Latency.of([t.gen for t in r.timed]).fields(),
        "per_prompt_acceptance_rate": spread_of([a.rate for a in per_prompt]),
        "per_prompt_tau": spread_of([a.tau for a in per_prompt]),
        "compile": p.compile,
        "compile_s": p.compile_s,
        "compile_error": p.compile_error,
        "kv_cache": gens[0].kv_path,
        "target_kv_bytes": max(g.target_kv_bytes for g in gens),
        "draft_kv_bytes": max(g.draft_kv_bytes for g in gens),
        "target_weights_bytes": weights,
        "roofline": line,
        "step_s": mean_step_s(steps) if c.kind == Kind.TARGET_ONLY else None,
    }


def _peer_figures(r, measured: Acceptance) -> dict:
    """Throughput, and acceptance where the peer's steps were counted (transformers_peer.py)."""
    tokens = sum(len(t.tokens) for t in r.timed)
    seconds = sum(t.total_s for t in r.timed)
    f = {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
    }
    overlaps = [o for t in _first_pass(r) if t.counted is not None for o in t.counted.overlaps]
    f.update(exactness(measured.accepted, overlaps))
    if measured.steps:
        per_prompt = [Acceptance.of(t.steps, _width(r.cell)) for t in _first_pass(r)]
        f.update(measured.fields())
        f["per_prompt_acceptance_rate"] = spread_of([a.rate for a in per_prompt])
        f["per_prompt_tau"] = spread_of([a.tau for a in per_prompt])
    return f


def _outputs(ctx, r, prompts) -> list[Output]:
    decode = ctx.models.tokenizer.decode
    out = []
    for t in _first_pass(r):
        p = prompts[t.prompt]
        o = Output(
            id=p.id,
            category=p.category,
            tokens=t.tokens,
            text=decode(t.tokens, skip_special_tokens=True),
            tokens_per_s=len(t.tokens) / t.total_s if t.total_s else None,
        )
        if t.gen is not None:
            o.ttft_s = t.gen.ttft_s
        if t.steps:
            a = Acceptance.of(t.steps, _width(r.cell))
            o.steps = len(t.steps)
            o.acceptance_rate, o.alpha_measured, o.tau = a.rate, a.alpha, a.tau
        out.append(o)
    return out


def _lossless(ctx, r, base, prompts) -> dict:
    """Greedy output identical to the target's own? Each mismatch says where it starts and how
    close the target's own top-1/top-2 call was there (a near-tie, or a real fault)."""
    ref = {t.prompt: t.tokens for t in _first_pass(base)}
    mismatched = [t for t in _first_pass(r) if t.tokens != ref.get(t.prompt)]
    where = []
    try:  # a diagnosis that fails never costs the cell its figures
        from qspec.measure.invariance import divergence

        target = ctx.models.model("target", r.cell.target)
        for t in mismatched:
            p = prompts[t.prompt]
            d = divergence(ref.get(t.prompt, []), t.tokens, target, p.ids, id=p.id)
            if d is not None:
                where.append(d)
    except Exception as err:  # noqa: BLE001
        log.warning("could not locate where %s diverges: %s", r.cell.label(), err)
    return {
        "lossless": not mismatched,
        "lossless_mismatches": [prompts[t.prompt].id for t in mismatched],
        "lossless_divergence": where,
    }


def _predicted(ctx, r, prompts, measured: Acceptance, base, steps) -> dict:
    """Predicted acceptance on the text this cell visited: each prompt + its own emitted tokens.

    Under lossless speculative sampling the emitted tokens are samples of the target, so the
    same holds for sample cells. The first emitted token comes from the prefill and was never
    drafted, so it is not predicted. Greedy cells also replay the drafter over the output; a
    drafter whose steps vary (n-gram lookup, confidence stopping, the heuristic schedule) is
    predicted per step (measure/step_odds.py).
    """
    c = r.cell
    length = DraftLength(c.draft_length, c.gamma, ctx.cfg.confidence_threshold)
    target = ctx.models.model("target", c.target)
    sampler = ctx.sampler(c.mode)
    vary = steps_vary(c.draft, length)
    betas, greedy_draft, replayed, expected, first = [], [], [], None, _first_pass(r)
    for t in first:
        p = prompts[t.prompt]
        if len(t.tokens) < 2:
            continue
        ids = torch.cat([p.ids, torch.tensor(t.tokens, device=p.ids.device)])
        start = p.ids.numel() + 1
        drafter = ctx.models.drafter(c.draft, c.target)
        own, argmax_q = on_policy_betas(target, drafter, ids, start, sampler)
        own = own.tolist()
        betas += own
        greedy_draft += argmax_q.tolist() if argmax_q is not None else []
        if drafter.target_layers:  # a head: rolled out over the text, greedy or sampled
            drafter = ctx.models.drafter(c.draft, c.target)
            odds = head_odds(target, drafter, ids, start, sampler, length.widest)
            run = expected_run(odds, len(t.tokens), length, p.max_new_tokens)
            expected = run if expected is None else expected + run
        elif c.mode == "greedy":
            drafter = ctx.models.drafter(c.draft, c.target)
            # a quantized draft's numbers depend on the cache's size: the cell's own
            replayed += replay_greedy(
                drafter, p.ids, t.tokens, length, p.max_new_tokens, r.prepared.capacity
            )
        elif vary:
            drafter = ctx.models.drafter(c.draft, c.target)
            odds = sampled_odds(target, drafter, ids, start, sampler, length, own)
            run = expected_run(odds, len(t.tokens), length, p.max_new_tokens)
            expected = run if expected is None else expected + run
    if vary and c.mode == "greedy" and replayed:
        expected = Expected.of_steps(replayed, length.widest)
    if head_kind(c.draft) is not None:
        how = "the head rolled out over the output from the target's teacher-forced states"
    elif c.mode == "greedy":
        how = "the drafter replayed over the output, exactly"
    else:
        how = "expected steps from per-draft odds over the output"
    prediction = Prediction.of(betas, c.mode, length, expected if vary else None, how)
    f = prediction.fields(measured) if prediction is not None else {}
    if greedy_draft and not vary:  # what vLLM's "greedy" draft sampling would accept here
        alpha = sum(greedy_draft) / len(greedy_draft)
        f["alpha_predicted_greedy_draft"] = alpha
        f["acceptance_rate_predicted_greedy_draft"] = expected_acceptance_rate(alpha, c.gamma)
    if replayed and prediction is not None:
        f.update(Replay.of(replayed, [s for t in first for s in t.gen.steps]).fields(c.gamma))
    if base is not None:
        base_step = mean_step_s([s for t in base.timed for s in t.gen.steps])
        cost = CostModel.of(steps, base_step)
        if cost is not None and prediction is not None:
            f.update(prediction.cost_fields(cost))
        if c.draft_length == "fixed":
            f.update(oracle_fields(steps, base_step))
    return f

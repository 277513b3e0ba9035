"""The figures of one measured cell: acceptance, latency, memory, paired speedups, predictions.

Acceptance and outputs come from the first repeat (every repeat uses the same seeds, so
the same tokens); timings come from every repeat. Speedups are paired: each generation of
a cell is divided by the baseline's generation of the same prompt and repeat, measured
moments apart (generation.py interleaves them), and the interval comes from those ratios.
"""

from __future__ import annotations

import logging
import math

import torch

from qspec.measure.acceptance import (
    acceptance,
    expected_acceptance_rate,
    expected_tau,
    latency,
    spread_of,
)
from qspec.measure.memory import cell_measure, process_peak
from qspec.measure.prediction import on_policy_beta, replay_greedy
from qspec.measure.roofline import roofline
from qspec.measure.stats import ratio_interval
from qspec.records import GenerationRecord, Kind

log = logging.getLogger("qspec")

AGREEMENT = 0.05  # predicted and measured alpha agree within max(this, 2 standard errors)


def cell_record(ctx, r, prompts, base, peer) -> GenerationRecord:
    """The record of CellRun r; base is its group's target-only run, peer (for transformers'
    cells) the qspec speculative run of the same draft and gamma."""
    c = r.cell
    rec = bare_record(ctx, r, r.status, r.error)
    if r.status != "ok":
        return rec
    f: dict = {"n_prompts": len(prompts), "repeats": ctx.cfg.repeats, "draft_skip": r.draft_skip}
    if c.kind == Kind.SPECULATIVE:
        drafting = [s for t in r.timed for s in t.gen.steps if s.drafted]
        f["mean_drafted"] = sum(s.drafted for s in drafting) / len(drafting) if drafting else None
    invariance = ctx.invariance.get((ctx.models.target_ref.ref, c.target))
    f["target_batch_invariant"] = invariance["batch_invariant"] if invariance else None
    f.update(_memory(ctx, r))
    f.update(_engine_figures(ctx, r, prompts) if c.kind != Kind.HF_ASSISTED else _hf_figures(r))
    f["outputs"] = _outputs(ctx, r, prompts)
    if c.kind != Kind.TARGET_ONLY and base is not None and base.status == "ok":
        f.update(_against(r, base, "speedup"))
        if c.mode == "greedy":
            f.update(_lossless(ctx, r, base, prompts))
    if peer is not None and peer.status == "ok":
        f.update(_against(peer, r, "qspec_over_hf"))
    rec = GenerationRecord.model_validate({**rec.model_dump(), **f})
    if c.kind == Kind.SPECULATIVE:
        update = _predicted(ctx, r, prompts, rec)
        if base is not None and base.status == "ok":
            update.update(_cost_model(r, base, update.get("tau_predicted")))
            if c.draft_length == "fixed":
                update.update(_oracle(r, base))
        rec = GenerationRecord.model_validate({**rec.model_dump(), **update})
    price = ctx.cfg.price_per_device_hour
    if price is not None and rec.tokens_per_s:
        rec.usd_per_million_tokens = price / 3600 / rec.tokens_per_s * 1e6
        rec.price_per_device_hour = price
    return rec


def bare_record(ctx, r, status: str, error: str | None) -> GenerationRecord:
    """A cell's record with its coordinates and status, before any figure."""
    c = r.cell
    return GenerationRecord(
        key=r.key,
        kind=c.kind,
        suite=c.suite,
        target=c.target,
        draft=c.draft,
        gamma=c.gamma,
        mode=c.mode,
        draft_length=c.draft_length,
        reference=ctx.reference,
        hardware=ctx.hardware_label,
        status=status,
        error=error,
    )


def _first_pass(r) -> list:
    return [t for t in r.timed if t.repeat == 0]


def _memory(ctx, r) -> dict:
    rise = max((t.memory_rise for t in r.timed), default=0)
    f = {
        "peak_memory_bytes": r.own_weights + rise,
        "peak_memory_measure": cell_measure(ctx.device),
        "memory_rise_bytes": rise,
    }
    if ctx.targets is not None:  # a process of this target's group alone: its peak is the group's
        f["group_peak_memory_bytes"], f["group_peak_memory_measure"] = process_peak(ctx.device)
    return f


def _engine_figures(ctx, r, prompts) -> dict:
    c = r.cell
    gens = [t.gen for t in _first_pass(r)]
    every = [t.gen for t in r.timed]
    f = {**acceptance([s for g in gens for s in g.steps], c.gamma), **latency(every)}
    per_prompt = [acceptance(g.steps, c.gamma) for g in gens]
    f.update(
        per_prompt_acceptance_rate=spread_of([a["acceptance_rate"] for a in per_prompt]),
        per_prompt_tau=spread_of([a["tau"] for a in per_prompt]),
        compile=r.compile,
        compile_s=r.compile_s,
        compile_error=r.compile_error,
        kv_cache=gens[0].kv_path,
        target_kv_bytes=max(g.target_kv_bytes for g in gens),
        draft_kv_bytes=max(g.draft_kv_bytes for g in gens),
    )
    weights = ctx.models.build("target", c.target).weights_bytes
    f["target_weights_bytes"] = weights
    steps = [s for g in every for s in g.steps]
    if c.kind == Kind.TARGET_ONLY:
        f["roofline"] = roofline(
            "decode", weights, [s.draft_s + s.verify_s for s in steps], ctx.bandwidth
        )
        f["step_s"] = _step_s(r)
    else:
        verify = [s.verify_s for s in steps if s.drafted]
        f["roofline"] = roofline("verify", weights, verify, ctx.bandwidth)
    return f


def _hf_figures(r) -> dict:
    tokens = sum(len(t.tokens) for t in r.timed)
    seconds = sum(t.total_s for t in r.timed)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
    }


def _step_s(r) -> float | None:
    """Mean seconds per decode step over every timed step of every repeat."""
    steps = [s for t in r.timed for s in t.gen.steps]
    return sum(s.draft_s + s.verify_s for s in steps) / len(steps) if steps else None


def _outputs(ctx, r, prompts) -> list[dict]:
    decode = ctx.models.tokenizer.decode
    out = []
    for t in _first_pass(r):
        p = prompts[t.prompt]
        o = {
            "id": p.id,
            "category": p.category,
            "tokens": t.tokens,
            "text": decode(t.tokens, skip_special_tokens=True),
            "tokens_per_s": len(t.tokens) / t.total_s if t.total_s else None,
        }
        if t.gen is not None:
            a = acceptance(t.gen.steps, r.cell.gamma)
            o.update(
                ttft_s=t.gen.ttft_s,
                steps=len(t.gen.steps),
                acceptance_rate=a["acceptance_rate"],
                alpha_measured=a["alpha_measured"],
                tau=a["tau"],
            )
        out.append(o)
    return out


def _rate(t, decode_only: bool) -> float | None:
    if not decode_only:
        return len(t.tokens) / t.total_s if t.total_s > 0 else None
    if t.gen is None:
        return None
    seconds = t.total_s - t.gen.prefill_s
    return (len(t.tokens) - 1) / seconds if seconds > 0 and len(t.tokens) > 1 else None


def _ratios(num, den, decode_only: bool = False) -> list[float]:
    """Per-prompt throughput ratios of two runs, each generation paired with the other run's
    generation of the same prompt and repeat; repeats of a prompt are averaged (geometric
    mean), so n is the number of prompts and prompt-to-prompt variation is in the interval."""
    by = {(t.prompt, t.repeat): _rate(t, decode_only) for t in den.timed}
    logs: dict[int, list[float]] = {}
    for t in num.timed:
        a, b = _rate(t, decode_only), by.get((t.prompt, t.repeat))
        if a and b:
            logs.setdefault(t.prompt, []).append(math.log(a / b))
    return [math.exp(sum(xs) / len(xs)) for xs in logs.values()]


def _against(num, den, name: str) -> dict:
    """Geometric mean of paired per-prompt ratios with a 95% interval: end to end and decode only."""
    f = {}
    for suffix, decode_only in (("", False), ("_decode", True)):
        ratios = _ratios(num, den, decode_only)
        if not ratios:
            continue
        mean, low, high = ratio_interval(ratios)
        f[name + suffix] = mean
        f[f"{name}{suffix}_ci95"] = [low, high] if low is not None else None
        f[f"{name}{suffix}_pairs"] = len(ratios)
    return f


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
            d = divergence(ref.get(t.prompt, []), t.tokens, target, prompts[t.prompt].ids)
            if d is not None:
                where.append({"id": prompts[t.prompt].id, **d})
    except Exception as err:  # noqa: BLE001
        log.warning("could not locate where %s diverges: %s", r.cell.label(), err)
    return {
        "lossless": not mismatched,
        "lossless_mismatches": [prompts[t.prompt].id for t in mismatched],
        "lossless_divergence": where,
    }


def _predicted(ctx, r, prompts, rec: GenerationRecord) -> dict:
    """Predicted acceptance on the text this cell visited: each prompt + its own emitted tokens.

    Under lossless speculative sampling the emitted tokens are samples of the target, so the
    same holds for sample cells. The first emitted token comes from the prefill and was never
    drafted, so it is not predicted. Greedy cells also replay the drafter over the output.
    """
    c = r.cell
    target = ctx.models.model("target", c.target)
    sampler = ctx.sampler(c.mode)
    betas, replayed = [], []
    for t in _first_pass(r):
        p = prompts[t.prompt]
        if len(t.tokens) < 2:
            continue
        ids = torch.cat([p.ids, torch.tensor(t.tokens, device=p.ids.device)])
        drafter = ctx.models.drafter(c.draft, c.target)
        betas.append(on_policy_beta(target, drafter, ids, p.ids.numel() + 1, sampler).cpu())
        if c.mode == "greedy":
            drafter = ctx.models.drafter(c.draft, c.target)
            replayed += replay_greedy(
                drafter,
                p.ids,
                t.tokens,
                c.gamma,
                p.max_new_tokens,
                c.draft_length,
                ctx.cfg.confidence_threshold,
                capacity=r.capacity,  # a quantized draft's numbers depend on the cache's size
            )
    b = torch.cat(betas) if betas else torch.empty(0)
    if b.numel() == 0:
        return {}
    alpha = float(b.mean())
    se = float(b.std() / b.numel() ** 0.5) if b.numel() > 1 else None
    f = {
        "alpha_predicted": alpha,
        "alpha_predicted_se": se,
        "alpha_predicted_positions": b.numel(),
        "alpha_predicted_on": (
            f"on policy: each prompt + this cell's own {c.mode} output "
            "(the prefill's token excluded)"
        ),
    }
    if c.draft_length == "fixed":  # Leviathan's expectations hold for a fixed gamma
        f.update(
            tau_predicted=expected_tau(alpha, c.gamma),
            acceptance_rate_predicted=expected_acceptance_rate(alpha, c.gamma),
        )
    if rec.alpha_measured is not None and rec.tested:
        a, n = rec.alpha_measured, rec.tested
        tolerance = max(AGREEMENT, 2 * (a * (1 - a) / n) ** 0.5)
        f["alpha_gap"] = a - alpha
        # Confidence stopping tests only the drafts the draft was sure of, so its measured
        # alpha is conditional on that choice and the every-position prediction is not its
        # estimate (measured on the default model: 0.92 vs 0.83 predicted): no verdict.
        if c.draft_length != "confidence":
            f["alpha_agrees"] = abs(a - alpha) <= tolerance
    if replayed:
        measured = [(s.drafted, s.accepted, s.emitted) for t in _first_pass(r) for s in t.gen.steps]
        rep = acceptance(replayed, c.gamma)
        f.update(
            tau_replay=rep["tau"],
            alpha_replay=rep["alpha_measured"],
            replay_exact=measured == [(s.drafted, s.accepted, s.emitted) for s in replayed],
        )
    return f


def _cost_model(r, base, tau_predicted) -> dict:
    """Predicted speedup tau / (gamma c + v) with c and v measured over every timed step."""
    base_step = _step_s(base)
    steps = [s for t in r.timed for s in t.gen.steps]
    drafted = sum(s.drafted for s in steps)
    if not base_step or not steps or tau_predicted is None:
        return {}
    c = sum(s.draft_s for s in steps) / max(drafted, 1) / base_step
    v = sum(s.verify_s for s in steps) / len(steps) / base_step
    return {
        "draft_cost_ratio": c,
        "verify_cost_ratio": v,
        "speedup_predicted": tau_predicted / (r.cell.gamma * c + v),
    }


def _oracle(r, base) -> dict:
    """The decode speed had every step drafted exactly the tokens it went on to accept.

    Built from the cell's own per-step data and measured costs: a step that accepted n
    drafts would have drafted n (all of a full accept), costing n draft steps and one
    verify (n = 0: a plain decode step), and emitted the same n + 1 tokens. The verify
    cost is the cell's measured (gamma+1)-token verify, an upper bound for fewer tokens.
    """
    steps = [s for t in r.timed for s in t.gen.steps]
    drafting = [s for s in steps if s.drafted]
    base_step = _step_s(base)
    if not drafting or not base_step:
        return {}
    per_draft = sum(s.draft_s for s in drafting) / sum(s.drafted for s in drafting)
    verify = sum(s.verify_s for s in drafting) / len(drafting)
    seconds = sum(s.accepted * per_draft + verify if s.accepted else base_step for s in steps)
    rate = sum(s.emitted for s in steps) / seconds
    base_rate = 1 / base_step
    return {"oracle_decode_tokens_per_s": rate, "oracle_speedup_decode": rate / base_rate}

"""Stage 3: the generation cells, target-only, speculative and transformers' peer.

Each cell generates from the same prompts with the same seeds; its record carries measured
acceptance, latency, memory and outputs, its speedup against the target-only cell of the
same target and mode (which the plan puts first), and acceptance predicted on the text
it visited.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from collections.abc import Iterator

import torch

from qspec.baselines import hf_assisted
from qspec.compare import against_baseline
from qspec.engine import Generation, generate
from qspec.environment import describe
from qspec.memory import peak_bytes, reset_peak
from qspec.metrics import acceptance, expected_acceptance_rate, expected_tau, latency
from qspec.plan import Cell, key_of_cell, plan
from qspec.precisions import MODEL_FREE_DRAFTER_NAMES
from qspec.predict import on_policy_beta
from qspec.prompts import EncodedPrompt, encode_prompts, stop_ids
from qspec.records import GenerationRecord, Kind
from qspec.roofline import roofline
from qspec.stages.context import RunContext, Skip

log = logging.getLogger("qspec")

Baselines = dict[tuple[str, str, str], GenerationRecord]  # (suite, target, mode) -> target-only


def generation_stage(ctx: RunContext, progress) -> Iterator[GenerationRecord]:
    cells = plan(ctx.cfg, list(ctx.suites), ctx.device.type)
    prompts: dict[str, list[EncodedPrompt]] = {}
    baselines: Baselines = {}
    with progress.task("cells", total=len(cells)) as advance:
        for cell in cells:
            advance(cell.label())
            key = key_of_cell(cell, ctx.cfg, ctx.device.type, ctx.versions)
            rec = ctx.finished.cell(key)
            if rec is None:
                if cell.suite not in prompts and "target" not in ctx.models.errors:
                    suite = ctx.suites[cell.suite]
                    prompts[cell.suite] = encode_prompts(
                        ctx.models.tokenizer,
                        suite.prompts,
                        ctx.cfg.max_prompts,
                        ctx.cfg.max_new_tokens,
                        ctx.device,
                    )
                rec = run_cell(ctx, cell, key, prompts.get(cell.suite, []), baselines)
                yield rec
            if cell.kind == Kind.TARGET_ONLY and rec.ok:
                baselines[(cell.suite, cell.target, cell.mode)] = rec


def run_cell(
    ctx: RunContext, cell: Cell, key: str, prompts: list[EncodedPrompt], baselines: Baselines
) -> GenerationRecord:
    """Measure one cell; any fault becomes the record's status and error, never an exception."""
    rec = GenerationRecord(
        key=key,
        kind=cell.kind,
        suite=cell.suite,
        target=cell.target,
        draft=cell.draft,
        gamma=cell.gamma,
        mode=cell.mode,
        reference=ctx.reference,
        hardware=describe(ctx.device),
    )
    try:
        rec = _with(rec, measure(ctx, cell, prompts, baselines))
        if cell.kind != Kind.TARGET_ONLY:
            rec = _with(rec, against_baseline(rec, baselines.get(_base_key(cell))))
        if cell.kind == Kind.SPECULATIVE:
            rec = _with(rec, predicted(ctx, cell, prompts, rec, baselines))
    except Skip as skip:
        rec.status, rec.error = skip.status, skip.reason
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        rec.status, rec.error = "failed", f"out of memory: {err}"
    except Exception as err:  # noqa: BLE001 - a fault in one cell never loses the others
        rec.status, rec.error = "failed", f"{type(err).__name__}: {err}"
        log.debug(traceback.format_exc())
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    price = ctx.cfg.price_per_device_hour
    if price is not None and rec.tokens_per_s:
        rec.usd_per_million_tokens = price / 3600 / rec.tokens_per_s * 1e6
        rec.price_per_device_hour = price
    return rec


def _with(rec: GenerationRecord, figures: dict) -> GenerationRecord:
    """The record with more figures, validated (a misnamed figure is an error, not a new field)."""
    return GenerationRecord.model_validate({**rec.model_dump(), **figures})


def _base_key(cell: Cell) -> tuple[str, str, str]:
    return (cell.suite, cell.target, cell.mode)


def measure(ctx: RunContext, cell: Cell, prompts: list[EncodedPrompt], baselines) -> dict:
    if ctx.fault is not None:
        ctx.fault(cell)
    target = ctx.models.model("target", cell.target)
    if not prompts:
        raise Skip("unavailable", f"suite {cell.suite!r} declares no prompts")
    drafter = ctx.models.drafter(cell.draft) if cell.draft is not None else None
    if cell.kind == Kind.HF_ASSISTED:
        return measure_hf(ctx, cell, target, drafter, prompts)
    return measure_engine(ctx, cell, target, drafter, prompts)


def _outputs(ctx: RunContext, prompts, token_lists) -> list[dict]:
    decode = ctx.models.tokenizer.decode
    return [
        {
            "id": p.id,
            "category": p.category,
            "tokens": toks,
            "text": decode(toks, skip_special_tokens=True),
        }
        for p, toks in zip(prompts, token_lists, strict=True)
    ]


def measure_engine(ctx: RunContext, cell: Cell, target, drafter, prompts) -> dict:
    cfg = ctx.cfg
    compile = bool(cfg.compile)
    # one cache size for every prompt, the warm-up included: compiled shapes never change
    capacity = max(p.ids.numel() + p.max_new_tokens for p in prompts) + cell.gamma + 1
    run = dict(
        drafter=drafter,
        gamma=cell.gamma,
        sampler=ctx.sampler(cell.mode),
        eos_ids=stop_ids(ctx.models.tokenizer, target),
        compile=compile,
        capacity=capacity,
    )
    # Compilation happens in the first warm-up; it is timed here and never counted as latency.
    # A model torch.compile cannot handle (a quantization kernel it cannot trace, say) is
    # measured eagerly instead, and the record says why.
    warmup_s, compile_error = [], None
    for _ in range(max(cfg.warmup, 1 if compile else 0)):
        t = time.perf_counter()
        try:
            generate(
                target, prompts[0].ids, max_new_tokens=min(8, prompts[0].max_new_tokens), **run
            )
        except Exception as err:  # noqa: BLE001
            if not run["compile"]:
                raise
            compile_error = f"{type(err).__name__}: {err}"[:500]
            log.warning("torch.compile failed for %s; measuring eagerly: %s", cell, err)
            compile = run["compile"] = False
        warmup_s.append(time.perf_counter() - t)
    reset_peak(ctx.device)
    timed: list[Generation] = []
    for _ in range(cfg.repeats):  # same seeds each pass: same outputs, more timing samples
        for i, p in enumerate(prompts):
            gen_rng = torch.Generator(ctx.device).manual_seed(cfg.seed + i)
            timed.append(
                generate(target, p.ids, max_new_tokens=p.max_new_tokens, generator=gen_rng, **run)
            )
    gens = timed[: len(prompts)]
    peak, peak_what = peak_bytes(ctx.device)
    steps = [s for g in gens for s in g.steps]
    outputs = _outputs(ctx, prompts, [g.tokens for g in gens])
    for out, g in zip(outputs, gens, strict=True):
        out.update(
            tokens_per_s=len(g.tokens) / g.total_s if g.total_s else None,
            ttft_s=g.ttft_s,
            steps=len(g.steps),
        )
    built = ctx.models.build("target", cell.target)
    rec = {
        **acceptance(steps, cell.gamma),
        **latency(timed),
        "repeats": cfg.repeats,
        "n_prompts": len(prompts),
        "compile": compile,
        # first warm-up generation (8 tokens) including compilation; None when not compiled
        "compile_s": warmup_s[0] if compile else None,
        "compile_error": compile_error,
        "kv_cache": gens[0].kv_path,
        "peak_memory_bytes": peak,
        "peak_memory_measure": peak_what,
        "target_kv_bytes": max(g.target_kv_bytes for g in gens),
        "draft_kv_bytes": max(g.draft_kv_bytes for g in gens),
        "outputs": outputs,
        "target_weights_bytes": built.weights_bytes,
    }
    all_steps = [s for g in timed for s in g.steps]
    if cell.kind == Kind.TARGET_ONLY:
        step_times = [s.draft_s + s.verify_s for s in all_steps]
        rec["roofline"] = roofline("decode", built.weights_bytes, step_times, ctx.bandwidth)
        rec.update(tau=1.0, step_s=(rec["draft_s"] + rec["verify_s"]) / max(len(steps), 1))
        return rec
    verify = [s.verify_s for s in all_steps if s.drafted]
    rec["roofline"] = roofline("verify", built.weights_bytes, verify, ctx.bandwidth)
    return rec


def predicted(ctx: RunContext, cell: Cell, prompts, rec: GenerationRecord, baselines) -> dict:
    """Teacher-forced prediction on the text this generation visits: prompt + the target's greedy output."""
    base = baselines.get(_base_key(cell))
    greedy_base = baselines.get((cell.suite, cell.target, "greedy")) or base
    if greedy_base is None:
        return {}
    target = ctx.models.model("target", cell.target)
    drafter = ctx.models.drafter(cell.draft)
    sampler = ctx.sampler(cell.mode)
    continuation = {o.id: o.tokens for o in greedy_base.outputs}
    betas = []
    for p in prompts:
        cont = continuation.get(p.id) or []
        if not cont:
            continue
        ids = torch.cat([p.ids, torch.tensor(cont, device=p.ids.device)])
        betas.append(on_policy_beta(target, drafter, ids, p.ids.numel(), sampler).cpu())
    b = torch.cat(betas) if betas else torch.empty(0)
    if b.numel() == 0:
        return {}
    alpha = float(b.mean())
    out = {
        "alpha_predicted": alpha,
        "alpha_predicted_positions": b.numel(),
        "alpha_predicted_on": "on policy: prompts + the target's own greedy continuation",
        "tau_predicted": expected_tau(alpha, cell.gamma),
        "acceptance_rate_predicted": expected_acceptance_rate(alpha, cell.gamma),
    }
    if base is not None and rec.steps and base.step_s:
        c = (rec.draft_s / max(rec.drafted, 1)) / base.step_s
        v = (rec.verify_s / rec.steps) / base.step_s
        out.update(
            draft_cost_ratio=c,
            verify_cost_ratio=v,
            speedup_predicted=out["tau_predicted"] / (cell.gamma * c + v),
        )
    return out


def measure_hf(ctx: RunContext, cell: Cell, target, drafter, prompts) -> dict:
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
    for _ in range(ctx.cfg.warmup):
        first = prompts[0]
        hf_assisted(target, first.ids, max_new_tokens=min(8, first.max_new_tokens), seed=0, **run)
    reset_peak(ctx.device)
    token_lists, seconds = [], 0.0
    for i, p in enumerate(prompts):
        toks, secs = hf_assisted(
            target, p.ids, max_new_tokens=p.max_new_tokens, seed=ctx.cfg.seed + i, **run
        )
        token_lists.append(toks)
        seconds += secs
    peak, peak_what = peak_bytes(ctx.device)
    tokens = sum(len(t) for t in token_lists)
    return {
        "n_prompts": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "outputs": _outputs(ctx, prompts, token_lists),
        "peak_memory_bytes": peak,
        "peak_memory_measure": peak_what,
    }

"""Stage 2: the teacher-forced pass over each suite corpus.

Per target variant: perplexity, KL and top-1 agreement against the reference (QualityRecord).
Per (target, model draft) pair: acceptance predicted from the two distributions, before any
generation (PairScreenRecord).
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Iterator

from qspec.engine.cross_tokenizer import token_bytes
from qspec.keys import key_of_record, key_of_stage
from qspec.measure.acceptance import expected_acceptance_rate, expected_tau
from qspec.measure.teacher_forced import quality_pass, tokenize_corpus
from qspec.models.precisions import PRECISION_NAMES, reference_precision, self_precision
from qspec.records import Kind, PairScreenRecord, PredictedAt, QualityRecord, Record, Skip
from qspec.stages.context import RunContext

log = logging.getLogger("qspec")

CORPUS = "suite corpus, teacher-forced, temperature 1"


def quality_stage(ctx: RunContext, progress) -> Iterator[Record]:
    if not ctx.cfg.quality.enabled or "target" in ctx.models.errors:
        return
    for suite in ctx.suites.values():
        stage_key = key_of_stage(
            Kind.QUALITY, ctx.cfg, ctx.device.type, ctx.versions, suite=suite.name
        )
        if ctx.finished.stage(stage_key):
            continue
        try:
            records = suite_quality(ctx, suite, progress)
        except Exception as err:  # noqa: BLE001 - never lose the rest of the run
            log.debug(traceback.format_exc())
            records = [
                QualityRecord(
                    suite=suite.name, status="failed", error=f"{type(err).__name__}: {err}"
                )
            ]
        for rec in records:
            rec.stage_key = stage_key
            rec.key = key_of_record(stage_key, rec)
            yield rec


def _built(ctx: RunContext, role: str, precision: str):
    try:
        return ctx.models.model(role, precision)
    except Skip:
        return None


def _screened_models(ctx: RunContext) -> tuple[dict, dict]:
    """(name -> built model, drafter -> its model's name there): every built target variant
    and model draft of the target's tokenizer (no n-gram, no layer-skip); a variant of another
    draft model is 'draft:<p>', the target's own (self:<p>) is the target variant <p>."""
    cfg, models, names = ctx.cfg, {}, {}
    for precision in dict.fromkeys(cfg.target.precisions + cfg.quality.variants):
        model = _built(ctx, "target", precision)
        if model is not None:
            models[precision] = model
    for drafter in cfg.draft.precisions:
        own = self_precision(drafter)
        if own is not None:
            role, precision, name = "target", own, own
        elif drafter in PRECISION_NAMES and not ctx.models.cross_tokenizer:
            # a draft of another tokenizer is predicted per cell only, on policy
            role, precision = "draft", drafter
            name = drafter if ctx.models.same_model else f"draft:{drafter}"
        else:
            continue
        model = _built(ctx, role, precision)
        if model is not None:
            names[drafter] = name
            models.setdefault(name, model)
    return models, names


def suite_quality(ctx: RunContext, suite, progress) -> list[Record]:
    """One quality_pass over the suite corpus with every built target and model draft."""
    cfg = ctx.cfg
    models, names = _screened_models(ctx)
    reference = ctx.reference
    if reference not in models:
        error = f"reference variant {reference!r} was not built"
        return [QualityRecord(suite=suite.name, status="failed", error=error)]
    texts = suite.corpus()
    if not texts:
        return []
    q = cfg.quality
    ids = tokenize_corpus(ctx.models.tokenizer, texts, q.max_tokens)
    pairs = [
        (t, n) for t in cfg.target.precisions if t in models for n in dict.fromkeys(names.values())
    ]
    with progress.task(f"quality pass on {suite.name}", total=1) as advance:
        advance(f"{len(models)} variants, {q.max_tokens} tokens")
        result = quality_pass(
            models,
            reference,
            ids,
            window=q.window,
            stride=q.stride,
            sample=ctx.sampler("sample"),
            pairs=pairs,
            max_tokens=q.max_tokens,
        )
    byte_len = token_bytes(ctx.models.tokenizer)
    records = _records(ctx, suite, result, reference, names)
    n_bytes = sum(len(byte_len.get(t, b"")) for t in ids[0][1 : result.tokens + 1])
    _add_bits_per_byte(records, n_bytes)
    if ctx.models.cross_tokenizer:
        records += _draft_quality(ctx, suite, texts, scored_bytes=n_bytes)
    return records


def _add_bits_per_byte(records, n_bytes: int) -> None:
    for r in records:
        if isinstance(r, QualityRecord) and r.nll_mean is not None and n_bytes:
            r.bytes_scored = n_bytes
            r.bits_per_byte = r.nll_mean * r.positions / math.log(2) / n_bytes


def _draft_quality(ctx: RunContext, suite, texts, scored_bytes: int) -> list[Record]:
    """A draft model with another tokenizer, scored on the same corpus bytes in its own
    tokens: its variants against its own best one, and bits per byte beside the target's."""
    cfg, models = ctx.cfg, {}
    for precision in cfg.draft.precisions:
        model = _built(ctx, "draft", precision) if precision in PRECISION_NAMES else None
        if model is not None:
            models[precision] = model
    if not models or not scored_bytes:
        return []
    tokenizer = ctx.models.draft_tokenizer
    byte_len = token_bytes(tokenizer)
    stream = tokenize_corpus(tokenizer, texts, None)[0]
    n_bytes, m = 0, 0
    while m + 1 < len(stream) and n_bytes < scored_bytes:
        m += 1
        n_bytes += len(byte_len.get(stream[m], b""))
    reference = reference_precision(list(models), ctx.device.type)
    q = cfg.quality
    result = quality_pass(
        models,
        reference,
        [stream[: m + 1]],
        window=q.window,
        stride=q.stride,
        sample=ctx.sampler("sample"),
        pairs=[],
        max_tokens=m,
    )
    records = [
        QualityRecord(
            suite=suite.name,
            variant=f"draft:{name}",
            model=ctx.models.draft_ref.ref,
            reference=f"draft:{reference}",
            corpus=CORPUS + ", in the draft model's own tokens",
            windows=result.windows,
            **stats,
        )
        for name, stats in result.variants.items()
    ]
    _add_bits_per_byte(records, n_bytes)
    return records


def _records(ctx: RunContext, suite, result, reference: str, names: dict) -> list[Record]:
    cfg, records = ctx.cfg, []
    screened = cfg.target.precisions + cfg.quality.variants
    target_ref = ctx.models.target_ref.ref
    for name, stats in result.variants.items():
        if name not in screened:
            continue
        built = ctx.models.built.get((target_ref, name))
        records.append(
            QualityRecord(
                suite=suite.name,
                variant=name,
                reference=reference,
                corpus=CORPUS,
                windows=result.windows,
                weights_bytes=built.weights_bytes if built else None,
                **stats,
            )
        )
    for (target, model), stats in result.pairs.items():
        records += [
            PairScreenRecord(
                suite=suite.name,
                target=target,
                draft=drafter,
                on="suite corpus (teacher-forced)",
                sampling=cfg.sampling.model_dump(),
                predicted={str(g): _expected(stats, g) for g in cfg.gammas},
                **stats,
            )
            for drafter, name in names.items()
            if name == model
        ]
    return records


def _expected(stats: dict, gamma: int) -> PredictedAt:
    g, s = stats["alpha_predicted_greedy"], stats["alpha_predicted_sample"]
    return PredictedAt(
        tau=expected_tau(g, gamma),
        acceptance_rate=expected_acceptance_rate(g, gamma),
        tau_sample=expected_tau(s, gamma),
        acceptance_rate_sample=expected_acceptance_rate(s, gamma),
    )

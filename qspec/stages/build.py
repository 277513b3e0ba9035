"""Stage 1: build every variant the plan needs, once, and record its size, its build time and
whether it is batch-invariant (or why it could not be built)."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator

from qspec.keys import key_of_variant
from qspec.measure.teacher_forced import tokenize_corpus
from qspec.plan import variant_roles
from qspec.records import Invariance, VariantRecord
from qspec.stages.context import RunContext

log = logging.getLogger("qspec")


def build_variants(ctx: RunContext) -> Iterator[VariantRecord]:
    models, texts = ctx.models, {}
    for role, _, precision in variant_roles(ctx.cfg):  # a self-draft is the target's variant
        if role in models.errors:
            continue
        ref = models.ref(role)
        built = models.build(role, precision)
        rec = VariantRecord(
            key=key_of_variant(ref.ref, precision, ctx.device.type),
            model=ref.ref,
            precision=precision,
            model_note=ref.note,
            status=built.status,
            error=built.error,
            weights_bytes=built.weights_bytes,
            build_s=built.build_s,
        )
        if built.model is not None:
            tokenizer = models.tokenizer_of(role)
            if id(tokenizer) not in texts:
                texts[id(tokenizer)] = _suite_text(ctx, tokenizer)
            rec.batch_invariance = _invariance(ctx, built, texts[id(tokenizer)])
            if rec.batch_invariance is not None:
                rec.batch_invariant = rec.batch_invariance.batch_invariant
                ctx.invariance[(ref.ref, precision)] = rec.batch_invariance
        yield rec


def _suite_text(ctx: RunContext, tokenizer):
    """Token ids of the first suite corpus that has text, for the invariance check."""
    import torch

    for suite in ctx.suites.values():
        try:
            texts = suite.corpus()
        except Exception:  # noqa: BLE001
            continue
        if texts:
            ids = tokenize_corpus(tokenizer, texts, ctx.cfg.quality.invariance_positions + 16)[0]
            return torch.tensor(ids, device=ctx.device)
    return None


def _invariance(ctx: RunContext, built, ids) -> Invariance | None:
    """One (gamma+1)-token forward against gamma+1 one-token forwards, as the engine runs them."""
    if ids is None:
        return None
    k = max(ctx.cfg.gammas) + 1
    try:
        from qspec.measure.invariance import batch_invariance

        return batch_invariance(
            built.model, ids, k, max_positions=ctx.cfg.quality.invariance_positions
        )
    except Exception as err:  # noqa: BLE001 - a missing figure never costs the variant
        log.debug(traceback.format_exc())
        log.warning("batch-invariance check failed: %s", err)
        return None

"""Stage 1: build every variant the plan needs, once, and record its size or why it is missing."""

from __future__ import annotations

from collections.abc import Iterator

from qspec.plan import key_of_variant
from qspec.precisions import MODEL_FREE_DRAFTER_NAMES
from qspec.records import VariantRecord
from qspec.stages.context import RunContext


def build_variants(ctx: RunContext) -> Iterator[VariantRecord]:
    cfg, models = ctx.cfg, ctx.models
    roles = [("target", p) for p in cfg.target.precisions]
    roles += [("draft", p) for p in cfg.draft.precisions if p not in MODEL_FREE_DRAFTER_NAMES]
    seen = set()
    for role, precision in roles:
        if role in models.errors:
            continue
        ref = models.ref(role)
        if (ref.ref, precision) in seen:  # a self-draft is the target's own variant
            continue
        seen.add((ref.ref, precision))
        built = models.build(role, precision)
        yield VariantRecord(
            key=key_of_variant(ref.ref, precision, ctx.device.type),
            model=ref.ref,
            precision=precision,
            model_note=ref.note,
            status=built.status,
            error=built.error,
            weights_bytes=built.weights_bytes,
            build_s=built.build_s,
        )

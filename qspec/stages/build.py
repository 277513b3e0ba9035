"""Stage 1: build every variant the plan needs, once, and record its size, its build time and
whether it is batch-invariant (or why it could not be built); then train (or load) every draft
head the plan needs, and record what it learned from and how well it drafts held-out text."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator

from qspec.keys import key_of_head, key_of_variant
from qspec.measure.teacher_forced import tokenize_corpus
from qspec.plan import head_builds, variant_roles
from qspec.records import HeadRecord, Invariance, Skip, VariantRecord
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
            **format_of(precision, built.model),
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


BUILDERS = {"int8": "bitsandbytes", "int8-t0": "bitsandbytes", "nf4": "bitsandbytes"}
BUILDERS.update({"fp4": "bitsandbytes", "gptq-int4": "gptqmodel"})


def format_of(precision: str, model) -> dict:
    """A variant's scheme, format, builder and numerics, as its record says them."""
    fmt = getattr(model, "qspec_format", None)
    if fmt is not None:  # a compressed-tensors checkpoint (models/compressed.py)
        keys = ("scheme", "format", "builder", "numerics")
        return {**{k: fmt.get(k) for k in keys}, "build_record": fmt.get("build")}
    if model is None:
        return {}
    builder = BUILDERS.get(precision, "transformers")
    return {"scheme": precision, "builder": builder, "numerics": "kernels"}


def build_heads(ctx: RunContext) -> Iterator[HeadRecord]:
    """Each head once: trained on its target variant (or found in the cache), or loaded."""
    if "target" in ctx.models.errors:
        return
    for name, on in head_builds(ctx.cfg, ctx.device.type):
        key = key_of_head(ctx.cfg, name, on, ctx.device.type)
        if ctx.finished.cell(key) is not None:
            continue
        rec = HeadRecord(key=key, model=ctx.models.target_ref.ref, name=name)
        rec.trained_on = None if on == "user" else on
        try:
            made = ctx.models.head(name, on if on != "user" else ctx.reference)
        except Skip as skip:
            rec.status, rec.error = skip.status, skip.reason
            yield rec
            continue
        yield head_record(rec, made)


def head_record(rec: HeadRecord, made) -> HeadRecord:
    """A head's record from what models/heads.py made or found."""
    r, head = made.report, made.head
    own = [p for name, p in head.named_parameters() if not name.startswith("embed")]
    rec.folder, rec.cached, rec.build_s = str(made.folder), made.cached, made.seconds
    rec.weights_bytes = sum(p.numel() * p.element_size() for p in own)
    rec.draft_vocab_size, rec.aux_layers = head.cfg.draft_vocab_size, list(head.cfg.aux_layers)
    keys = ("train_tokens", "heldout_tokens", "steps", "epochs", "tokens_seen", "seed")
    keys += ("collect_seconds", "init_seconds", "train_seconds", "seconds", "final_loss")
    keys += ("threads", "unroll", "lr", "window", "checkpoint", "layout")
    rec.training = {k: r[k] for k in keys if k in r}
    held = {k: v for k, v in r.items() if k.startswith("a_") or k.startswith("heldout_")}
    if "draft_vocab_covers" in r:
        held["draft_vocab_covers"] = r["draft_vocab_covers"]
    if "before" in r:
        held["before_training"] = r["before"]
    rec.heldout = held or None
    return rec


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

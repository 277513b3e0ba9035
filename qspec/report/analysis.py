"""One run's records grouped, ordered as its config lists them, and what every section shares:
labels, the reference variant, the target-only baselines, weights and sample-size captions."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from qspec.engine.draft_length import DRAFT_LENGTHS
from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES, PRECISION_NAMES, self_precision
from qspec.records import (
    GENERATION_KINDS,
    GenerationRecord,
    HeadRecord,
    Kind,
    Output,
    PairScreenRecord,
    QualityRecord,
    Record,
    ServingRecord,
    TaskLosslessRecord,
    TaskRecord,
    VariantRecord,
)
from qspec.report.budget import Budget, variant_quality
from qspec.report.format import fmt, text
from qspec.report.load import load_run

MODES = ("greedy", "sample")


def pos(xs: list, v) -> int:
    return xs.index(v) if v in xs else len(xs)


def order(seen: list, preferred, keep_empty: bool = False) -> list:
    """Values in the config's order first, then any others in order of appearance."""
    out = []
    preferred = preferred if isinstance(preferred, list | tuple) else []
    for v in list(preferred) + seen:
        if isinstance(v, str) and v in seen and v not in out:
            out.append(v)
    for v in seen:
        if v not in out:
            out.append(v)
    return [v for v in out if v != "" or keep_empty]


def n_tokens(o: Output) -> int | None:
    """Generated tokens of one output; None where the writer did not store them."""
    return len(o.tokens) if "tokens" in o.model_fields_set else None


def prompt_times(c: GenerationRecord) -> dict[str, tuple[int, float, str]]:
    """prompt id -> (tokens, seconds, category) from a cell's outputs."""
    out = {}
    for o in c.outputs:
        n, tps = n_tokens(o), o.tokens_per_s
        if n and tps:
            out[o.id] = (n, n / tps, o.category or "(none)")
    return out


def draft_name(draft: str | None, skip: list[int] | None, model: str | None = None) -> str:
    """A draft as shown: a layer-skip draft with the layers it leaves out, and a precision of
    another model (model, when the draft is not the target's) with that model's name."""
    if draft is None:
        return "—"
    if model and draft in PRECISION_NAMES:
        return f"{model} {draft}"
    if skip:
        shown = ", ".join(str(i) for i in skip[:12]) + (", …" if len(skip) > 12 else "")
        return f"{draft} (skips layers {shown})"
    return draft


def not_lossless(run: Run) -> dict[tuple[str, str], list[str]]:
    """(target, draft) -> reasons its speculative output differs from the target's own."""
    out = defaultdict(list)
    for c in run.spec:
        if c.mode == "greedy" and c.lossless is False:
            ids = c.lossless_mismatches
            what = f"greedy output differs from target-only at γ={c.gamma}"
            if c.draft_length != "fixed":
                what += f" ({c.draft_length} draft length)"
            if run.multi_suite():
                what += f" on suite {c.suite}"
            if ids:
                what += f" ({len(ids)} prompt(s): {', '.join(ids[:5])})"
            out[(c.target, text(c.draft))].append(what)
    for t in run.task_lossless:
        if t.equal is False:
            out[(t.target, t.draft)].append(
                f"task {text(t.task)}: accuracy {fmt(t.accuracy_plain, 3)} plain "
                f"vs {fmt(t.accuracy_speculative, 3)} speculative"
            )
        elif t.outputs_identical is False:
            docs = t.mismatched_docs
            out[(t.target, t.draft)].append(
                f"task {text(t.task)}: generated answers differ"
                + (f" on {len(docs)} document(s)" if docs else "")
            )
    return dict(out)


def _of(records: list[Record], cls: type) -> list:
    return [r for r in records if isinstance(r, cls)]


class Run:
    """The records of one run and what several sections need from them, computed once."""

    def __init__(self, run_dir: Path, budget: Budget | None = None):
        self.dir = Path(run_dir)
        self.budget = budget or Budget()
        self.info, records, self.notes = load_run(self.dir)
        self.config = self.info.config
        self.variants: list[VariantRecord] = _of(records, VariantRecord)
        self.heads: list[HeadRecord] = _of(records, HeadRecord)
        cells: list[GenerationRecord] = _of(records, GenerationRecord)
        self.quality: list[QualityRecord] = _of(records, QualityRecord)
        self.screens: list[PairScreenRecord] = _of(records, PairScreenRecord)
        self.tasks: list[TaskRecord] = _of(records, TaskRecord)
        self.task_lossless: list[TaskLosslessRecord] = _of(records, TaskLosslessRecord)
        self.serving: list[ServingRecord] = _of(records, ServingRecord)

        tcfg, dcfg = self._model_config("target"), self._model_config("draft")
        self.target_ref, self.draft_ref = tcfg.get("ref"), dcfg.get("ref")
        # a draft model other than the target: its precisions are shown with its name
        other = self.draft_ref and self.target_ref and self.draft_ref != self.target_ref
        self.draft_model = Path(str(self.draft_ref)).name if other else None
        self.suites = order(
            [r.suite for r in cells + self.quality + self.tasks],
            self.info.suites or self.config.get("suites"),
            keep_empty=True,
        )
        self.targets = order([c.target for c in cells], tcfg.get("precisions"))
        self.drafts = order([c.draft for c in cells if c.draft is not None], dcfg.get("precisions"))
        self.modes = order([c.mode for c in cells], MODES)
        self.cells: list[GenerationRecord] = sorted(cells, key=self.sort_key)
        self.ok = [c for c in self.cells if c.ok]
        self.spec = [c for c in self.ok if c.kind == Kind.SPECULATIVE]
        self.reference = self._reference()
        self.hardware_label = self._hardware_label()
        self.is_cpu = self._is_cpu()
        self.baseline = {
            (c.suite, c.target, c.mode): c for c in self.ok if c.kind == Kind.TARGET_ONLY
        }
        self.variant_weights = self._variant_weights()
        self.vq = {v: variant_quality(self, v) for v in self.all_variants()}
        self.not_lossless = not_lossless(self)

    def _model_config(self, which: str) -> dict:
        cfg = self.config.get(which)
        return cfg if isinstance(cfg, dict) else {}

    # -- identity and labels

    def _reference(self) -> str | None:
        for r in self.quality + self.cells:
            if r.reference is not None:
                return r.reference
        return self.targets[0] if self.targets else None

    def _hardware_label(self) -> str:
        label = self.info.hardware_label
        if not label:
            labels = {c.hardware for c in self.cells if c.hardware}
            label = " / ".join(sorted(labels)) if labels else None
        return label or "unknown hardware"

    def _is_cpu(self) -> bool:
        device = self.info.hardware.get("device")
        if device is not None:
            return text(device).lower() == "cpu"
        return self.hardware_label.lower().startswith("cpu")

    def all_variants(self) -> list[str]:
        seen = [v.precision for v in self.variants]
        seen += [text(q.variant) for q in self.quality + self.tasks]
        return order(seen + self.targets, self.targets + self.drafts)

    def sort_key(self, c: GenerationRecord) -> tuple:
        """Suite, target, mode, kind (target-only first), draft, gamma: the config's order."""
        return (
            pos(self.suites, c.suite),
            pos(self.targets, c.target),
            pos(self.modes, c.mode),
            pos(list(GENERATION_KINDS), c.kind),
            -1 if c.draft is None else pos(self.drafts, c.draft),
            c.gamma,
            pos(list(DRAFT_LENGTHS), c.draft_length),
        )

    def multi_suite(self) -> bool:
        return len(self.suites) > 1

    def label(self, c: GenerationRecord, suite: bool | None = None) -> str:
        if c.kind == Kind.TARGET_ONLY:
            s = f"{c.target} alone, {c.mode}"
        elif c.kind == Kind.HF_TARGET_ONLY:
            s = f"{c.target} alone, {c.mode} (transformers generate)"
        else:
            s = f"{c.target} + {self.draft_name(c.draft, c.draft_skip)} γ={c.gamma} {c.mode}"
            if c.draft_length != "fixed":
                s += f" ({c.draft_length} draft length)"
            if c.kind == Kind.HF_ASSISTED:
                lookup = c.draft in MODEL_FREE_DRAFTER_NAMES
                s += " (HF prompt lookup)" if lookup else " (HF assisted)"
        if suite if suite is not None else self.multi_suite():
            s = f"[{c.suite}] {s}"
        return s

    def draft_name(self, draft: str | None, skip: list[int] | None = None) -> str:
        return draft_name(draft, skip, self.draft_model)

    def base_of(self, c: GenerationRecord) -> GenerationRecord | None:
        """The target-only cell a cell's speed is compared with: same suite, target and mode."""
        return self.baseline.get((c.suite, c.target, c.mode))

    # -- memory

    def _variant_weights(self) -> dict[tuple[str, str], int]:
        out = {}
        for v in self.variants:
            if v.weights_bytes is None:
                continue
            out.setdefault(("any", v.precision), v.weights_bytes)
            if v.model == self.target_ref:
                out[("target", v.precision)] = v.weights_bytes
            if v.model == self.draft_ref:
                out[("draft", v.precision)] = v.weights_bytes
        return out

    def target_weights(self, target: str | None) -> float | None:
        for c in self.cells:
            if c.target == target and c.target_weights_bytes is not None:
                return c.target_weights_bytes
        t = text(target)
        return self.variant_weights.get(("target", t), self.variant_weights.get(("any", t)))

    def draft_weights(self, draft: str | None) -> float | None:
        if draft is None:
            return 0.0
        own = self_precision(draft)
        if own is not None:  # the target model's own variant
            return self.target_weights(own)
        w = self.variant_weights.get(("draft", draft), self.variant_weights.get(("any", draft)))
        if w is None and not any(v.precision == draft for v in self.variants):
            return 0.0  # a model-free drafter (n-gram): no weights
        return w

    def weights_total(self, c: GenerationRecord) -> float | None:
        t = self.target_weights(c.target)
        shared = c.kind == Kind.TARGET_ONLY or self_precision(c.draft or "") == c.target
        d = 0.0 if shared else self.draft_weights(c.draft)  # the target drafting for itself
        return t + d if t is not None and d is not None else None

    # -- sample-size captions

    def caption(self, cells: list[GenerationRecord]) -> str:
        if not cells:
            return f"no measured cells; {self.hardware_label}"
        parts = [f"{len(cells)} cell{'s' if len(cells) != 1 else ''}"]
        for field, what in (
            ("n_prompts", "prompts"),
            ("tokens", "generated tokens"),
            ("steps", "target steps"),
        ):
            vals = [getattr(c, field) for c in cells if getattr(c, field) is not None]
            if vals:
                lo, hi = min(vals), max(vals)
                span = f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
                parts.append(f"{span} {what} per cell")
        return "; ".join(parts) + f"; measured on {self.hardware_label}"

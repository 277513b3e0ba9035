"""What a run will measure, before anything is loaded: its cells, the variants they need,
and every record the run will write.

Torch-free, so the report can list the cells a partial run is missing with the runner's
own plan. The keys that identify each record for resume are in keys.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qspec.config import RunConfig
from qspec.keys import (
    key_of_cell,
    key_of_head,
    key_of_record,
    key_of_serving,
    key_of_stage,
    key_of_variant,
)
from qspec.models.precisions import (
    MODEL_FREE_DRAFTER_NAMES,
    drafter_variant,
    head_kind,
    parse_skip,
    reference_precision,
)
from qspec.records import (
    GenerationRecord,
    HeadRecord,
    Kind,
    QualityRecord,
    Record,
    ServingRecord,
    TaskLosslessRecord,
    TaskRecord,
    VariantRecord,
)

# transformers' prompt lookup as its documentation runs it (prompt_lookup_num_tokens=10,
# max_matching_ngram_size left at its default of 2): a peer cell beside the n-gram drafter's
HF_PROMPT_LOOKUP_TOKENS = 10


@dataclass(frozen=True)
class Cell:
    kind: Kind  # target_only, speculative, hf_target_only or hf_assisted
    suite: str
    target: str
    draft: str | None
    gamma: int
    mode: str
    draft_length: str = "fixed"  # engine/draft_length.py: DRAFT_LENGTHS

    def coordinates(self) -> dict:
        """The cell's fields as every generation record carries them."""
        return {**asdict(self), "kind": self.kind}

    def label(self) -> str:
        length = "" if self.draft_length == "fixed" else f" {self.draft_length}"
        return (
            f"{self.kind} {self.suite} {self.target}/{self.draft or '-'} "
            f"g={self.gamma}{length} {self.mode}"
        )


def plan(cfg: RunConfig, suite_names: list[str], device: str = "cpu") -> list[Cell]:
    """Target-only first for each target and mode: speculative cells need its speed and outputs."""
    reference = reference_precision(cfg.target.precisions, device)
    cells = []
    if "qspec" not in cfg.engines:
        return cells
    for suite in suite_names:
        for target in cfg.target.precisions:
            for mode in cfg.modes:
                if mode == "sample" and cfg.sampled_targets == "reference" and target != reference:
                    continue
                cells.append(Cell(Kind.TARGET_ONLY, suite, target, None, 0, mode))
                for draft in cfg.draft.precisions:
                    for gamma in cfg.gammas:
                        for length in cfg.draft_lengths:
                            # confidence stopping reads the draft's probabilities: models only
                            if length == "confidence" and draft in MODEL_FREE_DRAFTER_NAMES:
                                continue
                            cells.append(
                                Cell(Kind.SPECULATIVE, suite, target, draft, gamma, mode, length)
                            )
                peer = cfg.hf_assisted_targets == "all" or target == reference
                if "hf_assisted" in cfg.baselines and mode in cfg.hf_assisted_modes and peer:
                    # transformers' plain generate: the peer's speedups are over its own loop
                    cells.append(Cell(Kind.HF_TARGET_ONLY, suite, target, None, 0, mode))
                    for draft in cfg.draft.precisions:
                        gammas = [max(cfg.gammas)]
                        if draft in MODEL_FREE_DRAFTER_NAMES:
                            gammas.append(HF_PROMPT_LOOKUP_TOKENS)
                        for gamma in dict.fromkeys(gammas):
                            cells.append(Cell(Kind.HF_ASSISTED, suite, target, draft, gamma, mode))
    return cells


SELF_DRAFT = (
    "the draft is this target variant itself (same model, same precision): each draft step "
    "costs a target step, so it cannot be faster than the target alone; not measured"
)


def drafts_for_itself(cfg: RunConfig, target: str, draft: str | None) -> bool:
    """A pairing whose draft is its own target variant (a layer-skip copy is not)."""
    variant = drafter_variant(draft) if draft is not None else None
    if variant is None or parse_skip(draft) is not None:
        return False
    role, precision = variant
    return precision == target and (role == "target" or cfg.draft.ref == cfg.target.ref)


SAME_HEAD = (
    "on the reference target the matched head is the reference-trained one (eagle3): the "
    "same head, measured once, under eagle3"
)


def repeats_reference_head(cfg: RunConfig, target: str, draft: str | None, device: str) -> bool:
    """eagle3-matched on the reference target: eagle3's own head again."""
    return head_kind(draft) == "matched" and target == reference_precision(
        cfg.target.precisions, device
    )


def served(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """The targets and drafts vLLM serves from qspec's builds: none when the run has no
    served engine, or measures a deployment at a URL."""
    if "vllm" not in cfg.engines or cfg.vllm.url:
        return [], []
    return list(cfg.vllm.targets), list(cfg.vllm.drafts)


def head_builds(cfg: RunConfig, device: str) -> list[tuple[str, str]]:
    """(drafter name, target precision it is trained on, or "user") of every head the run
    makes, once each: the generation cells' drafts and the served ones."""
    reference = reference_precision(cfg.target.precisions, device)
    served_targets, served_drafts = served(cfg)
    out: dict[tuple[str, str], None] = {}
    for name in [*cfg.draft.precisions, *served_drafts]:
        kind = head_kind(name)
        if kind == "reference":
            out[(name, reference)] = None
        elif kind == "matched":
            targets = [*cfg.target.precisions, *served_targets]
            out.update({(name, t): None for t in dict.fromkeys(targets) if t != reference})
        elif kind == "user":
            out[(name, "user")] = None
    return list(out)


# The pairing an existing deployment serves is read from it at run time ([vllm] url).
DEPLOYMENT = "deployment"


@dataclass(frozen=True)
class ServingCell:
    """One concurrency level of one pairing served by vLLM (draft None: the target alone)."""

    suite: str
    target: str
    draft: str | None
    gamma: int
    mode: str
    concurrency: int

    def coordinates(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return (
            f"vllm {self.suite} {self.target}/{self.draft or '-'} g={self.gamma} "
            f"{self.mode} c={self.concurrency}"
        )


def serving_plan(cfg: RunConfig, suite_names: list[str]) -> list[ServingCell]:
    """Per suite and served target: the target alone, then each draft, every mode and level."""
    if "vllm" not in cfg.engines:
        return []
    v = cfg.vllm
    gamma = v.gamma or max(cfg.gammas or [3])
    if v.url:
        pairings = [(DEPLOYMENT, None, 0)]
    else:
        pairings = [
            (t, d, g) for t in v.targets for d, g in [(None, 0)] + [(d, gamma) for d in v.drafts]
        ]
    return [
        ServingCell(suite, t, d, g, mode, level)
        for suite in suite_names
        for t, d, g in pairings
        for mode in v.modes
        for level in v.concurrency
    ]


def groups(cells: list[Cell]) -> list[list[Cell]]:
    """Cells sharing a suite, a target and a mode, in plan order (the target-only cell first).

    A group is measured interleaved, prompt by prompt, so that machine drift hits the
    baseline and every speculative cell alike and speedups are paired.
    """
    out: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        out.setdefault((c.suite, c.target, c.mode), []).append(c)
    return list(out.values())


# ----------------------------------------------------------------------------- variants


def variant_roles(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """Every (role, model ref, precision) the run builds, once each: the target precisions (and
    those screened for quality only), then the variants its drafters need. A self-draft of the
    target's own model is the target's variant, listed once."""
    out: dict[tuple[str, str], str] = {}
    for p in cfg.target.precisions + cfg.quality.variants:
        out.setdefault((cfg.target.ref, p), "target")
    for name in cfg.draft.precisions:
        variant = drafter_variant(name)
        if variant is not None:
            role, p = variant
            out.setdefault((cfg.target.ref if role == "target" else cfg.draft.ref, p), role)
    return [(role, ref, p) for (ref, p), role in out.items()]


def group_variants(cfg: RunConfig, target: str) -> list[tuple[str, str]]:
    """(role, precision) of the models one target's cell group uses: the target and its drafts."""
    drafts = [drafter_variant(name) for name in cfg.draft.precisions]
    return [("target", target)] + [v for v in dict.fromkeys(drafts) if v is not None]


# ----------------------------------------------------------------------------- every record


@dataclass(frozen=True)
class SuitePlan:
    """What planning needs of a suite, without loading it again (torch-free)."""

    name: str
    tasks: bool = False  # declares lm-eval tasks
    generative_task: str | None = None  # the local generate_until task a lossless check decodes


@dataclass(frozen=True)
class Planned:
    """One record the run will write (or, for quality and tasks, one stage writing several):
    which job writes it, and the failed record that stands for it if that job dies."""

    stage: str  # the job's stage: variants, quality, generation, tasks
    target: str | None  # the target variant whose job writes it (generation, tasks)
    record: Record  # coordinates, key and stage key; status failed
    # the records a stage measures together and yields at once (a cell group, a served target's
    # sweep): the run's time left knows they all arrive when the first does (eta.py)
    batch: str | None = None

    @property
    def keys(self) -> set[str]:
        return {k for k in (self.record.key, self.record.stage_key) if k}

    def failed(self, reason: str) -> Record:
        return self.record.model_copy(update={"error": reason})


def planned(cfg: RunConfig, suites: list[SuitePlan], device: str, versions: dict) -> list[Planned]:
    """Every record a run of this config writes, in stage order: the one list that the resume
    summary, the Ray executor's lost records and the report's missing cells all read."""
    failed = {"status": "failed"}
    out = [
        Planned(
            "variants",
            None,
            VariantRecord(key=key_of_variant(ref, p, device), model=ref, precision=p, **failed),
        )
        for _, ref, p in variant_roles(cfg)
    ]
    for name, on in head_builds(cfg, device):
        key = key_of_head(cfg, name, on, device)
        trained_on = None if on == "user" else on
        rec = HeadRecord(key=key, model=cfg.target.ref, name=name, trained_on=trained_on, **failed)
        out.append(Planned("variants", None, rec))
    if cfg.quality.enabled:
        for s in suites:
            out.append(
                Planned(
                    "quality",
                    None,
                    _staged(
                        QualityRecord(suite=s.name, **failed),
                        Kind.QUALITY,
                        cfg,
                        device,
                        versions,
                        suite=s.name,
                    ),
                )
            )
    for cell in plan(cfg, [s.name for s in suites], device):
        key = key_of_cell(cell, cfg, device, versions)
        rec = GenerationRecord(key=key, **cell.coordinates(), **failed)
        batch = f"generation {cell.suite} {cell.target} {cell.mode}"
        out.append(Planned("generation", cell.target, rec, batch))
    for cell in serving_plan(cfg, [s.name for s in suites]):
        key = key_of_serving(cell, cfg, device, versions)
        rec = ServingRecord(key=key, **cell.coordinates(), **failed)
        out.append(Planned("serving", None, rec, f"serving {cell.suite} {cell.target}"))
    if cfg.tasks.enabled:
        out += _planned_tasks(cfg, suites, device, versions)
    return out


def _planned_tasks(cfg, suites, device, versions) -> list[Planned]:
    out = []
    for s in (s for s in suites if s.tasks):
        for t in cfg.target.precisions:
            rec = TaskRecord(suite=s.name, variant=t, task="*", status="failed")
            out.append(
                Planned(
                    "tasks",
                    t,
                    _staged(rec, Kind.TASK, cfg, device, versions, suite=s.name, variant=t),
                )
            )
        for t, d in lossless_pairs(cfg, s, device):
            coords = dict(suite=s.name, target=t, draft=d, gamma=max(cfg.gammas or [0]))
            key = key_of_stage(Kind.TASK_LOSSLESS, cfg, device, versions, **coords)
            rec = TaskLosslessRecord(key=key, task=s.generative_task, status="failed", **coords)
            out.append(Planned("tasks", t, rec))
    return out


def lossless_pairs(cfg: RunConfig, suite: SuitePlan, device: str) -> list[tuple[str, str]]:
    """(target, draft) pairs whose greedy decoding of the suite's generative task is checked."""
    if cfg.tasks.lossless_check == "none" or suite.generative_task is None:
        return []
    everyone = cfg.tasks.lossless_check == "all"
    targets = (
        cfg.target.precisions if everyone else [reference_precision(cfg.target.precisions, device)]
    )
    return [(t, d) for t in targets for d in cfg.draft.precisions]


def _staged(rec: Record, kind: Kind, cfg, device, versions, **coords) -> Record:
    """A record written under a stage key, keyed as the stage keys its records."""
    rec.stage_key = key_of_stage(kind, cfg, device, versions, **coords)
    rec.key = key_of_record(rec.stage_key, rec)
    return rec

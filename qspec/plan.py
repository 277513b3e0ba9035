"""What a run will measure, before anything is loaded: its cells, their keys, the prompts.

Torch-free, so the report can list the cells a partial run is missing with the runner's
own plan. A key is a hash of everything that determines a result: a resumed run skips a
cell whose key is already stored as ok (or unavailable, which a rerun would not change).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from qspec.config import RunConfig
from qspec.models.precisions import (
    MODEL_FREE_DRAFTER_NAMES,
    drafter_variant,
    parse_skip,
    reference_precision,
)
from qspec.records import (
    GenerationRecord,
    Kind,
    QualityRecord,
    Record,
    ServingRecord,
    TaskLosslessRecord,
    TaskRecord,
    VariantRecord,
)
from qspec.store import cell_key

DONE = ("ok", "unavailable")
# transformers' prompt lookup as its documentation runs it (prompt_lookup_num_tokens=10,
# max_matching_ngram_size left at its default of 2): a peer cell beside the n-gram drafter's
HF_PROMPT_LOOKUP_TOKENS = 10


@dataclass(frozen=True)
class Cell:
    kind: Kind  # target_only, speculative or hf_assisted
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


def key_of_serving(cell: ServingCell, cfg: RunConfig, device: str, versions: dict) -> str:
    """A served level depends on its coordinates, the workload and the server's settings."""
    v = cfg.vllm.model_dump(exclude={"python", "concurrency", "targets", "drafts", "modes"})
    fields = asdict(cell)
    if cell.draft in MODEL_FREE_DRAFTER_NAMES:
        fields["ngram"] = [cfg.draft.ngram_min, cfg.draft.ngram_max]
    return cell_key(
        {
            **fields,
            "kind": "serving",
            "target_ref": cfg.target.ref,
            "draft_ref": cfg.draft.ref,
            "max_new_tokens": cfg.max_new_tokens,
            "max_prompts": cfg.max_prompts,
            "sampling": cfg.sampling.model_dump(),
            "seed": cfg.seed,
            "vllm": v,
            "device": device,
            "versions": versions,
        }
    )


def spread(prompts: list, n: int) -> list:
    """The first n prompts taken round-robin across categories, so small runs cover each one."""
    by_category: dict[str, list] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    queues = list(by_category.values())
    picked = []
    while len(picked) < min(n, len(prompts)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def key_of_cell(cell: Cell, cfg: RunConfig, device: str, versions: dict) -> str:
    """Everything a generation cell's result depends on: its coordinates and how it is measured."""
    fields = asdict(cell)
    if cell.draft_length == "fixed":  # keys of fixed-length cells as before adaptive lengths
        del fields["draft_length"]
    elif cell.draft_length == "confidence":
        fields["confidence_threshold"] = cfg.confidence_threshold
    if cell.draft in MODEL_FREE_DRAFTER_NAMES:
        fields["ngram"] = [cfg.draft.ngram_min, cfg.draft.ngram_max]
    return cell_key(
        {
            **fields,
            "kind": str(cell.kind),
            "target_ref": cfg.target.ref,
            "draft_ref": cfg.draft.ref,
            "max_new_tokens": cfg.max_new_tokens,
            "max_prompts": cfg.max_prompts,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "compile": cfg.compile,
            "sampling": cfg.sampling.model_dump(),
            "seed": cfg.seed,
            "device": device,
            "versions": versions,
        }
    )


def key_of_stage(kind: Kind, cfg: RunConfig, device: str, versions: dict, **coords) -> str:
    """A stage (quality, tasks, lossless check) depends on the whole model and run setup."""
    return cell_key(
        {
            "kind": str(kind),
            **coords,
            "target_ref": cfg.target.ref,
            "draft_ref": cfg.draft.ref,
            "target_precisions": cfg.target.precisions,
            "draft_precisions": cfg.draft.precisions,
            "sampling": cfg.sampling.model_dump(),
            "quality": cfg.quality.model_dump(),
            "tasks": cfg.tasks.model_dump(),
            "gammas": cfg.gammas,
            "seed": cfg.seed,
            "device": device,
            "versions": versions,
        }
    )


def key_of_variant(model: str, precision: str, device: str) -> str:
    return cell_key({"kind": "variant", "ref": model, "precision": precision, "device": device})


def key_of_record(stage_key: str, record: Record) -> str:
    """A unique key for one of the several records a stage writes under its stage key."""
    ident = {
        k: getattr(record, k, None)
        for k in ("kind", "suite", "variant", "target", "draft", "task", "metric")
    }
    ident["kind"] = str(ident["kind"])
    return cell_key({"stage": stage_key, **ident})


class Finished:
    """On resume: which cells and stages a previous attempt already stored as done."""

    def __init__(self, previous: Iterable[Record] = ()):
        self.by_key: dict[str, Record] = {}
        self.by_stage: dict[str, list[Record]] = {}
        for r in previous:
            self.by_key[r.key] = r
            if r.stage_key:
                self.by_stage.setdefault(r.stage_key, []).append(r)

    def cell(self, key: str) -> Record | None:
        """The stored record of a cell that needs no new measurement, else None."""
        r = self.by_key.get(key)
        return r if r is not None and r.status in DONE else None

    def stage(self, key: str) -> bool:
        """Was this stage (or single-record cell) stored, and every record of it done?"""
        if self.cell(key) is not None:
            return True
        rs = self.by_stage.get(key, [])
        return bool(rs) and all(r.status in DONE for r in rs)


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
        out.append(Planned("generation", cell.target, rec))
    for cell in serving_plan(cfg, [s.name for s in suites]):
        key = key_of_serving(cell, cfg, device, versions)
        out.append(Planned("serving", None, ServingRecord(key=key, **cell.coordinates(), **failed)))
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

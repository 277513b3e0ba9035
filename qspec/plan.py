"""What a run will measure, before anything is loaded: its cells, their keys, the prompts.

Torch-free, so the report can list the cells a partial run is missing with the runner's
own plan. A key is a hash of everything that determines a result: a resumed run skips a
cell whose key is already stored as ok (or unavailable, which a rerun would not change).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from qspec.config import RunConfig
from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES, reference_precision
from qspec.records import Kind, Record
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
    draft_length: str = "fixed"  # fixed, confidence or heuristic (engine.LENGTHS)

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
    for suite in suite_names:
        for target in cfg.target.precisions:
            for mode in cfg.modes:
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

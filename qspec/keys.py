"""Resume keys: what identifies a stored record, and what an earlier attempt stored.

A key is a hash of everything that determines a result: a resumed run skips a cell whose key
is already stored as ok (or unavailable, which a rerun would not change). Torch-free, like
the plan whose cells it keys and the store it is read from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING

from qspec.config import RunConfig
from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES
from qspec.records import Kind, Record
from qspec.store import cell_key

if TYPE_CHECKING:
    from qspec.plan import Cell, ServingCell

DONE = ("ok", "unavailable")


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


def key_of_head(cfg: RunConfig, name: str, trained_on: str, device: str) -> str:
    """A head depends on its target variant, the training settings and text (the suites)."""
    return cell_key(
        {
            "kind": "head",
            "name": name,
            "trained_on": trained_on,
            "target_ref": cfg.target.ref,
            "heads": cfg.heads.model_dump(),
            "suites": cfg.suites,
            "seed": cfg.seed,
            "device": device,
        }
    )


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

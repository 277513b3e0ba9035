"""Every record a run writes to results.jsonl, as typed models: one name per figure.

Writers build these models (an unknown field is an error); readers get them back through
`parse`, which upgrades records from older layouts first. The field names that docs/definitions.md
lists (alpha_measured, acceptance_rate, tau, speedup, lossless, ...) are kept as they are:
reports and tools outside qspec read them.

Torch-free on purpose: the report and config validation import this module.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from qspec.records.base import GENERATION_KINDS, Kind, Mode, Part, Record, Skip, Status
from qspec.records.built import (
    HeadRecord,
    Invariance,
    PairScreenRecord,
    PredictedAt,
    QualityRecord,
    TaskLosslessRecord,
    TaskRecord,
    VariantRecord,
)
from qspec.records.cell import Divergence, GenerationRecord, Output, Roofline, Spread
from qspec.records.served import Percentiles, ServingRecord

log = logging.getLogger("qspec")

__all__ = [
    "GENERATION_KINDS",
    "Kind",
    "Mode",
    "Part",
    "Record",
    "Skip",
    "Status",
    "Invariance",
    "PairScreenRecord",
    "PredictedAt",
    "QualityRecord",
    "TaskLosslessRecord",
    "TaskRecord",
    "VariantRecord",
    "HeadRecord",
    "Divergence",
    "GenerationRecord",
    "Output",
    "Roofline",
    "Spread",
    "Percentiles",
    "ServingRecord",
    "AnyRecord",
    "parse",
    "upgrade",
    "RunInfo",
    "CLASSES",
]

AnyRecord = Annotated[
    VariantRecord
    | HeadRecord
    | GenerationRecord
    | QualityRecord
    | PairScreenRecord
    | TaskRecord
    | TaskLosslessRecord
    | ServingRecord,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter = TypeAdapter(AnyRecord)
CLASSES = {
    Kind.VARIANT: VariantRecord,
    Kind.HEAD: HeadRecord,
    **{k: GenerationRecord for k in GENERATION_KINDS},
    Kind.QUALITY: QualityRecord,
    Kind.PAIR_SCREEN: PairScreenRecord,
    Kind.TASK: TaskRecord,
    Kind.TASK_LOSSLESS: TaskLosslessRecord,
    Kind.SERVING: ServingRecord,
}

# Fields written under two names by earlier versions: old name -> the one kept.
_RENAMED = {
    Kind.QUALITY: {"tokens": "positions", "kl_se": "kl_mean_se", "rms_dp": "dp_rms"},
}


def upgrade(raw: dict) -> dict:
    """A record of an older layout in today's names: renamed fields take their new name, and
    fields this version does not know are left out (listed in the debug log)."""
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in CLASSES:
        return raw
    out = dict(raw)
    for old, new in _RENAMED.get(Kind(kind), {}).items():
        if old in out:
            value = out.pop(old)
            if out.get(new) is None:
                out[new] = value
    known = CLASSES[Kind(kind)].model_fields
    unknown = sorted(set(out) - set(known))
    if unknown:
        log.debug("record %s: ignoring fields %s", raw.get("key"), unknown)
        for name in unknown:
            del out[name]
    return out


def parse(raw: dict) -> Record | None:
    """A typed record, or None for a kind this version does not know (or a malformed one)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
        return None
    if raw["kind"] not in CLASSES:
        return None
    try:
        return _ADAPTER.validate_python(upgrade(raw))
    except ValidationError as err:
        log.warning("record %s of kind %s not understood: %s", raw.get("key"), raw["kind"], err)
        return None


# ----------------------------------------------------------------------------- run.json


class RunInfo(BaseModel):
    """run.json: what the run was (config, versions, hardware, seed) and how far it got."""

    model_config = ConfigDict(extra="allow")

    config: dict[str, Any] = {}
    versions: dict[str, str | None] = {}
    hardware: dict[str, Any] = {}
    hardware_label: str | None = None
    seed: int | None = None
    memory_bandwidth: dict[str, Any] | None = None
    suites: list[str] = []
    status: str | None = None  # running, complete, partial, interrupted
    started: str | None = None
    finished: str | None = None
    cells_failed: int | None = None
    # how the cells ran: "local" (one process, one cell at a time) or "ray", with the
    # cluster's size and what each job asked for
    executor: dict[str, Any] | None = None
    # (item kind, seconds) of each planned item as it finished, in order (eta.py's rates)
    timeline: list[tuple[str, float] | tuple[str, float, str | None]] = []

"""What every record shares: the kinds, the status, a Part's and a Record's strictness.

Torch-free on purpose: the report and config validation import the records.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Status = Literal["ok", "failed", "unavailable"]
Mode = Literal["greedy", "sample"]


class Skip(Exception):
    """A cell or stage that cannot be measured (a model missing, no prompts): recorded, not fatal."""

    def __init__(self, status: Status, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Kind(StrEnum):
    VARIANT = "variant"
    HEAD = "head"  # a draft head trained (or loaded) for a target variant
    TARGET_ONLY = "target_only"
    SPECULATIVE = "speculative"
    HF_TARGET_ONLY = "hf_target_only"  # transformers' plain generate: the peer's own baseline
    HF_ASSISTED = "hf_assisted"
    QUALITY = "quality"
    PAIR_SCREEN = "pair_screen"
    TASK = "task"
    TASK_LOSSLESS = "task_lossless"
    SERVING = "serving"


GENERATION_KINDS = (Kind.TARGET_ONLY, Kind.SPECULATIVE, Kind.HF_TARGET_ONLY, Kind.HF_ASSISTED)
# the cells transformers runs (the peer), beside qspec's own engine cells
PEER_KINDS = (Kind.HF_TARGET_ONLY, Kind.HF_ASSISTED)


class Part(BaseModel):
    """A nested piece of a record (an output, a roofline): strict like the records."""

    model_config = ConfigDict(extra="forbid")


class Percentiles(Part):
    """A latency over many samples (seconds), with how many samples stand behind it."""

    p50: float
    p95: float
    p99: float
    mean: float
    n: int


class Record(Part):
    """What every record has: a resume key, a status and, when not ok, the reason."""

    key: str = ""
    stage_key: str | None = None  # the resume key of the stage that wrote it (quality, tasks)
    status: Status = "ok"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def dump(self) -> dict[str, Any]:
        """The JSON object written to results.jsonl."""
        return self.model_dump(mode="json")

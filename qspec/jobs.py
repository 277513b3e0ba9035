"""A run cut into jobs, for an executor that runs them in processes of their own (Ray).

A job is one stage over part of the run: the variant builds; the teacher-forced quality
pass (with its pair screening); and per target variant, its cell group (every suite and
mode: the target-only baseline and its speculative and peer cells, measured interleaved,
so the target's weights load once per group) and its tasks. A job whose worker dies loses
only its own unfinished records: `lost_records` writes them as failed, with the reason.

Torch-free, like the plan it is cut from.
"""

from __future__ import annotations

from dataclasses import dataclass

from qspec.config import RunConfig
from qspec.keys import Finished
from qspec.plan import Planned
from qspec.records import Record


@dataclass(frozen=True)
class Job:
    stage: str  # a key of qspec.stages.STAGES
    target: str | None = None  # generation and tasks: the one target variant it works on

    def label(self) -> str:
        return self.stage if self.target is None else f"{self.stage} {self.target}"


def jobs(cfg: RunConfig) -> tuple[Job, list[Job]]:
    """The build job, which every other job waits for (they reuse what it cached and need its
    batch-invariance figures), and the jobs that are independent of each other."""
    rest = [Job("quality")] if cfg.quality.enabled else []
    rest += [Job("generation", t) for t in cfg.target.precisions]
    if cfg.tasks.enabled:
        rest += [Job("tasks", t) for t in cfg.target.precisions]
    return Job("variants"), rest


def lost_records(
    job: Job, planned: list[Planned], written: set[str], finished: Finished, reason: str
) -> list[Record]:
    """What a job would have written and did not, as failed records that a --resume redoes.

    `planned` is the run's plan.planned(); `written` holds the keys and stage keys of the
    records the job did send back."""
    out = []
    for p in planned:
        if p.stage != job.stage or p.target != job.target or p.keys & written:
            continue
        if any(finished.stage(k) for k in p.keys):
            continue
        out.append(p.failed(reason))
    return out

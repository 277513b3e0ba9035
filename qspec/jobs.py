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
from qspec.models.precisions import draft_variant
from qspec.plan import Finished, key_of_cell, key_of_record, key_of_stage, key_of_variant, plan
from qspec.records import (
    GenerationRecord,
    Kind,
    QualityRecord,
    Record,
    TaskRecord,
    VariantRecord,
)


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
    job: Job,
    cfg: RunConfig,
    suites: list,
    device: str,
    versions: dict,
    model_refs: tuple[str, str],
    written: set[str],
    finished: Finished,
    reason: str,
) -> list[Record]:
    """What a job would have written and did not, as failed records that a --resume redoes.

    `written` holds the keys and stage keys of the records the job did send back."""
    failed = {"status": "failed", "error": reason}
    out: list[Record] = []
    if job.stage == "generation":
        for cell in plan(cfg, [s.name for s in suites], device):
            key = key_of_cell(cell, cfg, device, versions)
            if cell.target != job.target or key in written or finished.cell(key) is not None:
                continue
            coords = dict(suite=cell.suite, target=cell.target, draft=cell.draft, mode=cell.mode)
            out.append(
                GenerationRecord(
                    key=key,
                    kind=cell.kind,
                    gamma=cell.gamma,
                    draft_length=cell.draft_length,
                    **coords,
                    **failed,
                )
            )
    elif job.stage == "variants":
        target_ref, draft_ref = model_refs
        wanted = [(target_ref, p) for p in cfg.target.precisions + cfg.quality.variants]
        wanted += [(draft_ref, draft_variant(d)) for d in cfg.draft.precisions]
        for ref, precision in dict.fromkeys(w for w in wanted if w[1] is not None):
            key = key_of_variant(ref, precision, device)
            if key not in written:
                out.append(VariantRecord(key=key, model=ref, precision=precision, **failed))
    else:
        for suite in suites:
            if job.stage == "quality":
                coords, rec = {"suite": suite.name}, QualityRecord(suite=suite.name, **failed)
            elif suite.task_files or suite.task_names:
                coords = {"suite": suite.name, "variant": job.target}
                rec = TaskRecord(suite=suite.name, variant=job.target, task="*", **failed)
            else:
                continue
            kind = Kind.QUALITY if job.stage == "quality" else Kind.TASK
            stage_key = key_of_stage(kind, cfg, device, versions, **coords)
            if finished.stage(stage_key) or stage_key in written:
                continue
            rec.stage_key, rec.key = stage_key, key_of_record(stage_key, rec)
            out.append(rec)
    return out

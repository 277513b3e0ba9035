"""Stage 4: task accuracy per target variant through lm-eval, then the greedy lossless check.

Lossless decoding cannot change a task's accuracy, so accuracy is measured per target,
not per pairing; the lossless check decodes one generative task both ways to prove it.
"""

from __future__ import annotations

from collections.abc import Iterator

from qspec.keys import key_of_record, key_of_stage
from qspec.plan import lossless_pairs
from qspec.records import Kind, Record, Skip, TaskLosslessRecord, TaskRecord
from qspec.stages.context import RunContext


def task_stage(ctx: RunContext, progress) -> Iterator[Record]:
    if not ctx.cfg.tasks.enabled or "target" in ctx.models.errors:
        return
    for suite in ctx.suites.values():
        if not (suite.task_files or suite.task_names):
            continue
        for precision in ctx.cfg.target.precisions:
            if ctx.works_on(precision):
                yield from _accuracy(ctx, suite, precision, progress)
        yield from lossless_checks(ctx, suite, progress)


def _accuracy(ctx: RunContext, suite, precision: str, progress) -> Iterator[TaskRecord]:
    from qspec.lmeval.harness import run_tasks

    stage_key = key_of_stage(
        Kind.TASK, ctx.cfg, ctx.device.type, ctx.versions, suite=suite.name, variant=precision
    )
    if ctx.finished.stage(stage_key):
        return
    where = dict(suite=suite.name, variant=precision, task="*")
    try:
        model = ctx.models.model("target", precision)
        with progress.task(f"tasks {suite.name} {precision}", total=1) as advance:
            advance("lm-eval")
            try:
                records = run_tasks(
                    model,
                    ctx.models.tokenizer,
                    suite,
                    ctx.work_dir,
                    limit=ctx.cfg.tasks.limit,
                    seed=ctx.cfg.seed,
                    variant=precision,
                )
            except Exception as err:  # noqa: BLE001
                records = [
                    TaskRecord(**where, status="failed", error=f"{type(err).__name__}: {err}")
                ]
    except Skip as skip:
        records = [TaskRecord(**where, status=skip.status, error=skip.reason)]
    for rec in records:
        rec.stage_key = stage_key
        rec.key = key_of_record(stage_key, rec)
        yield rec


def lossless_checks(ctx: RunContext, suite, progress) -> Iterator[TaskLosslessRecord]:
    from qspec.lmeval.lossless import lossless_check

    cfg = ctx.cfg
    plan = suite.plan()
    task, gamma = plan.generative_task, max(cfg.gammas)
    for target, draft in lossless_pairs(cfg, plan, ctx.device.type):
        if not ctx.works_on(target):
            continue
        try:
            model = ctx.models.model("target", target)
        except Skip:
            continue
        coords = dict(suite=suite.name, target=target, draft=draft, gamma=gamma)
        key = key_of_stage(Kind.TASK_LOSSLESS, cfg, ctx.device.type, ctx.versions, **coords)
        if ctx.finished.stage(key):
            continue
        rec = TaskLosslessRecord(key=key, task=task, **coords)
        try:
            ctx.models.drafter(draft, target)
        except Skip as skip:
            yield rec.model_copy(update={"status": skip.status, "error": skip.reason})
            continue
        with progress.task(f"lossless {suite.name} {target}/{draft}", total=1) as advance:
            advance(task)
            try:
                rec = lossless_check(
                    model,
                    ctx.models.tokenizer,
                    suite,
                    ctx.work_dir,
                    drafter_factory=lambda d=draft, t=target: ctx.models.drafter(d, t),
                    gamma=gamma,
                    task=task,
                    limit=cfg.tasks.limit,
                    seed=cfg.seed,
                    record=rec,
                )
            except Exception as err:  # noqa: BLE001
                rec = rec.model_copy(
                    update={"status": "failed", "error": f"{type(err).__name__}: {err}"}
                )
        yield rec

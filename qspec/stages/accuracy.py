"""Stage 4: task accuracy per target variant through lm-eval, then the greedy lossless check.

Lossless decoding cannot change a task's accuracy, so accuracy is measured per target,
not per pairing; the lossless check decodes one generative task both ways to prove it.
"""

from __future__ import annotations

from collections.abc import Iterator

from qspec.plan import key_of_record, key_of_stage
from qspec.records import Kind, Record, TaskLosslessRecord, TaskRecord
from qspec.stages.context import RunContext, Skip
from qspec.suites.task_yaml import task_config


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
    try:
        model = ctx.models.model("target", precision)
        with progress.task(f"tasks {suite.name} {precision}", total=1) as advance:
            advance("lm-eval")
            try:
                results = run_tasks(
                    model,
                    ctx.models.tokenizer,
                    suite,
                    ctx.work_dir,
                    limit=ctx.cfg.tasks.limit,
                    seed=ctx.cfg.seed,
                )
            except Exception as err:  # noqa: BLE001
                results = [
                    {"task": "*", "status": "failed", "error": f"{type(err).__name__}: {err}"}
                ]
    except Skip as skip:
        results = [{"task": "*", "status": skip.status, "error": skip.reason}]
    for fields in results:
        rec = TaskRecord(suite=suite.name, variant=precision, **fields)
        rec.stage_key = stage_key
        rec.key = key_of_record(stage_key, rec)
        yield rec


def lossless_checks(ctx: RunContext, suite, progress) -> Iterator[TaskLosslessRecord]:
    from qspec.lmeval.harness import lossless_check

    cfg = ctx.cfg
    if cfg.tasks.lossless_check == "none":
        return
    task = generative_task(suite)
    if task is None:
        return
    targets = cfg.target.precisions if cfg.tasks.lossless_check == "all" else [ctx.reference]
    gamma = max(cfg.gammas)
    for target in filter(ctx.works_on, targets):
        try:
            model = ctx.models.model("target", target)
        except Skip:
            continue
        for draft in cfg.draft.precisions:
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
                    fields = lossless_check(
                        model,
                        ctx.models.tokenizer,
                        suite,
                        ctx.work_dir,
                        drafter_factory=lambda d=draft, t=target: ctx.models.drafter(d, t),
                        gamma=gamma,
                        task=task,
                        limit=cfg.tasks.limit,
                        seed=cfg.seed,
                    )
                except Exception as err:  # noqa: BLE001
                    fields = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            yield TaskLosslessRecord.model_validate({**rec.model_dump(), **fields})


def generative_task(suite) -> str | None:
    """The first local generate_until task of the suite (multiple choice does not generate)."""
    for path in suite.task_files:
        try:
            conf = task_config(path)
        except Exception:  # noqa: BLE001
            continue
        if conf.get("output_type") == "generate_until":
            return conf.get("task")
    return None

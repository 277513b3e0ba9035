"""The lossless check: one generate_until task decoded target-only and speculatively through
SpeculativeLM (the same engine code, the first run with no drafter). Greedy speculative
decoding must not change a single generated string, so the accuracies must be equal."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from qspec.lmeval.harness import (
    error_text,
    evaluate,
    local_tasks,
    metric_records,
    task_manager,
    task_output_type,
)
from qspec.lmeval.hf_models import SEED, speculative_lm
from qspec.lmeval.hub import hub_reachable
from qspec.records import TaskLosslessRecord
from qspec.suites.folder import Suite

log = logging.getLogger(__name__)


def lossless_check(
    model,
    tokenizer,
    suite: Suite,
    work_dir: Path,
    *,
    drafter_factory: Callable[[], object],
    gamma: int,
    task: str,
    limit: int | None,
    seed: int = SEED,
    record: TaskLosslessRecord | None = None,
) -> TaskLosslessRecord:
    """`record` (its coordinates and key) with the check's figures, or why it could not run."""
    rec = record or TaskLosslessRecord(suite=suite.name, target="", draft="", gamma=gamma)
    rec = rec.model_copy(update={"task": task, "gamma": gamma})
    try:
        manager, why_not = _manager_for(suite, Path(work_dir), task)
        if manager is None:
            return rec.model_copy(update=why_not)
        return rec.model_copy(
            update=_both_ways(model, tokenizer, task, manager, limit, seed, drafter_factory, gamma)
        )
    except Exception as exc:
        log.warning("lossless check on %s failed: %s", task, error_text(exc))
        return rec.model_copy(update={"status": "failed", "error": error_text(exc)})


def _manager_for(suite: Suite, work_dir: Path, task: str):
    """(lm-eval task manager that knows the task, None) or (None, the record's status)."""
    local, failures = local_tasks(suite, work_dir / "tasks" / suite.name)
    if task in local:
        kind = task_output_type(local[task])
        if kind != "generate_until":
            error = (
                f"task {task!r} is {kind}: it generates nothing, so there is no "
                "decoding to check (a generate_until task is needed)"
            )
            return None, {"status": "unavailable", "error": error}
        return task_manager(work_dir / "tasks" / suite.name, False), None
    if task in suite.task_names:
        ok, reason = hub_reachable()
        if not ok:
            error = f"lm-eval registry task {task!r} needs the Hugging Face hub: {reason}"
            return None, {"status": "unavailable", "error": error}
        return task_manager(work_dir / "tasks" / suite.name, True), None
    reasons = "; ".join(r["error"] for r in failures)
    error = f"task {task!r} is not in suite {suite.name!r}" + (
        f" (broken task files: {reasons})" if reasons else ""
    )
    return None, {"status": "failed", "error": error}


def _both_ways(model, tokenizer, task, manager, limit, seed, drafter_factory, gamma) -> dict:
    runs, out = {}, {}
    for label, factory, g in (("plain", None, 0), ("speculative", drafter_factory, gamma)):
        lm = speculative_lm(model, tokenizer, drafter_factory=factory, gamma=g, seed=seed)
        start = time.perf_counter()
        runs[label] = evaluate(lm, task, manager, limit=limit, seed=seed, log_samples=True)
        out[f"seconds_{label}"] = round(time.perf_counter() - start, 3)
        if label == "speculative" and lm.stats["drafted"]:
            out["acceptance"] = lm.stats["accepted"] / lm.stats["drafted"]
    metric, plain, n = _first_metric(runs["plain"], task)
    _, spec, _ = _first_metric(runs["speculative"], task)
    a, b = _outputs(runs["plain"], task), _outputs(runs["speculative"], task)
    return {
        **out,
        "metric": metric,
        "accuracy_plain": plain,
        "accuracy_speculative": spec,
        "equal": plain == spec,
        "n": n,
        "outputs_identical": a == b,
        "mismatched_docs": sorted(d for d in set(a) | set(b) if a.get(d) != b.get(d)),
        "status": "ok",
        "error": None,
    }


def _first_metric(results: dict, task: str) -> tuple[str | None, float | None, int]:
    recs = [r for r in metric_records(results, 0.0) if r["task"] == task]
    if not recs:
        return None, None, 0
    return recs[0]["metric"], recs[0]["value"], recs[0]["n"] or 0


def _outputs(results: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: list(s["filtered_resps"]) for s in results["samples"][task]}

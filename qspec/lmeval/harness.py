"""Task accuracy through lm-eval on an already-built in-memory model.

`run_tasks` scores a suite's lm-eval tasks on a model that is already loaded (and
quantized): the model is wrapped in lm-eval's HFLM, never reloaded. Local task YAMLs
are materialized with absolute data paths under ``work_dir/tasks/<suite>/`` and loaded
with ``TaskManager(include_defaults=False)``, which starts in ~0 s and needs no network.
Registry task names need lm-eval's built-in index and the Hugging Face hub; when the hub
cannot be reached they come back as "unavailable" records instead of an error. Each task
runs in its own lm-eval call, so one broken task is recorded as "failed" and the rest run.

This module imports lm-eval: the stages import it only when they score tasks.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from qspec.lmeval.hf_models import SEED, quiet_lm, quiet_logging
from qspec.lmeval.hub import hub_reachable
from qspec.records import TaskRecord
from qspec.suites.files import SuiteError
from qspec.suites.folder import Suite
from qspec.suites.task_yaml import materialize_task_yaml, task_config

log = logging.getLogger(__name__)


def _record(task: str, status: str, error: str | None = None, **fields) -> dict:
    rec = {
        "task": task,
        "metric": None,
        "value": None,
        "stderr": None,
        "n": 0,
        "status": status,
        "error": error,
    }
    rec.update(fields)
    return rec


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it could not compute
    return None if math.isnan(out) else out


def _doc_scores(samples: list[dict], metric: str, filt: str) -> dict[str, float]:
    """{doc_id: value} of one metric under one filter, so two variants can be paired per doc.

    lm-eval's logged samples (log_samples=True) hold one entry per (doc, filter) with every
    metric's per-doc value under its name. Corpus-level metrics (bleu, f1, mcc, perplexities)
    log tuples that only mean something aggregated: they get no per-doc scores.
    """
    out = {}
    for sample in samples:
        if sample.get("filter") != filt:
            continue
        value = sample.get(metric)
        value = None if isinstance(value, (str, bytes)) else _number(value)
        if value is None:
            return {}
        out[str(sample["doc_id"])] = value
    return out


def metric_records(results: dict, seconds: float) -> list[dict]:
    """One record per (task, metric) from a simple_evaluate result.

    Each carries lm-eval's higher_is_better for the metric and, when the result has logged
    samples, the per-document scores (doc_scores) that stats.paired_delta pairs.
    """
    out = []
    n_samples = results.get("n-samples", {})
    samples = results.get("samples", {})
    for task, entry in results.get("results", {}).items():
        n = n_samples.get(task, {}).get("effective", entry.get("sample_len"))
        directions = results.get("higher_is_better", {}).get(task, {})
        for key, value in entry.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else key
            higher = directions.get(metric)
            out.append(
                _record(
                    task,
                    "ok",
                    metric=name,
                    value=_number(value),
                    stderr=_number(entry.get(f"{metric}_stderr,{filt}")),
                    n=int(n) if n is not None else None,
                    seconds=round(seconds, 3),
                    higher_is_better=None if higher is None else bool(higher),
                    doc_scores=_doc_scores(samples.get(task, []), metric, filt),
                )
            )
    return out


def local_tasks(suite: Suite, out_dir: Path) -> tuple[dict[str, Path], list[dict]]:
    """Materialize the suite's YAMLs into out_dir: (task name -> YAML, failed records)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*out_dir.glob("*.yaml"), *out_dir.glob("*.yml")):
        stale.unlink()  # this folder is ours: a task dropped from the suite must not linger
    found: dict[str, Path] = {}
    failed: list[dict] = []
    for path in suite.task_files:
        path = Path(path)
        try:
            cfg = task_config(path, suite.path)
            name = cfg.get("task") or cfg.get("group")
            if not isinstance(name, str):
                raise SuiteError(f"{path}: no task name")
            if name in found:
                raise SuiteError(f"{path}: task name {name!r} defined twice")
            found[name] = materialize_task_yaml(path, out_dir, suite.path)
        except Exception as exc:
            failed.append(_record(path.stem, "failed", f"{path}: {error_text(exc)}"))
    return found, failed


def task_output_type(yaml_path: Path) -> str | None:
    try:
        return task_config(yaml_path).get("output_type")
    except SuiteError:
        return None


def evaluate(lm, task: str, manager, *, limit, seed: int, log_samples: bool) -> dict:
    quiet_logging()
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=manager,
        limit=limit,
        log_samples=log_samples,
        bootstrap_iters=1000,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if not results or not results.get("results"):
        raise RuntimeError(f"lm-eval returned no results for {task!r}")
    return results


def task_manager(include_path: Path, include_defaults: bool):
    quiet_logging()
    return TaskManager(include_path=str(include_path), include_defaults=include_defaults)


def run_tasks(
    model,
    tokenizer,
    suite: Suite,
    work_dir: Path,
    *,
    limit: int | None,
    tasks: list[str] | None = None,
    lm=None,
    seed: int = SEED,
    variant: str | None = None,
) -> list[TaskRecord]:
    """Accuracy per task of an in-memory model (the target `variant`): one TaskRecord per
    (task, metric), and one per task that failed or is unavailable, with the reason.

    Ok records carry seconds (wall time of the task's lm-eval call), higher_is_better
    (lm-eval's, None if it gives none) and doc_scores ({doc_id: per-doc value}, empty for
    corpus-level metrics). `limit` caps the docs per task; `tasks` selects tasks by name;
    `lm` replaces the default HFLM wrapper (e.g. a SpeculativeLM).
    """
    work_dir = Path(work_dir)
    local, failures = local_tasks(suite, work_dir / "tasks" / suite.name)
    wanted, records = _wanted(suite, local, failures, tasks)
    hub_tasks = [n for n in wanted if n not in local]
    hub_ok, hub_reason = (True, "")
    if hub_tasks:
        hub_ok, hub_reason = hub_reachable()
    managers: dict[bool, object] = {}
    for name in wanted:
        needs_hub = name not in local
        if needs_hub and not hub_ok:
            records.append(
                _record(
                    name,
                    "unavailable",
                    f"lm-eval registry task {name!r} needs the Hugging Face hub: {hub_reason}",
                )
            )
            continue
        start = time.perf_counter()
        try:
            if needs_hub not in managers:
                managers[needs_hub] = task_manager(work_dir / "tasks" / suite.name, needs_hub)
            if lm is None:
                lm = quiet_lm(model, tokenizer)
            # samples give per-doc scores for pairing variants; for tens of docs they cost ~0
            results = evaluate(
                lm, name, managers[needs_hub], limit=limit, seed=seed, log_samples=True
            )
            got = metric_records(results, time.perf_counter() - start)
            if not got:
                raise RuntimeError(f"lm-eval reported no metrics for {name!r}")
            records.extend(got)
        except Exception as exc:
            log.warning("task %s failed: %s", name, error_text(exc))
            records.append(_record(name, "failed", error_text(exc)))
    return [TaskRecord(suite=suite.name, variant=variant, **r) for r in records]


def _wanted(suite, local: dict, failures: list[dict], tasks) -> tuple[list[str], list[dict]]:
    """The task names to run, and failed records for broken files or names not in the suite
    (only those asked for when `tasks` names some)."""
    registry = list(suite.task_names)
    if tasks is None:
        return [*local, *registry], list(failures)
    wanted, records = [], []
    broken = "; ".join(r["error"] for r in failures)
    for name in dict.fromkeys(tasks):
        if name in local or name in registry:
            wanted.append(name)
        else:
            reason = f"task {name!r} is not in suite {suite.name!r}"
            if broken:
                reason += f" (task files that failed to load: {broken})"
            records.append(_record(name, "failed", reason))
    return wanted, records

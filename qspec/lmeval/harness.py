"""Task accuracy through lm-eval on an already-built in-memory model, and its lossless check.

`run_tasks` scores a suite's lm-eval tasks on a model that is already loaded (and
quantized): the model is wrapped in lm-eval's HFLM, never reloaded. Local task YAMLs
are materialized with absolute data paths under ``work_dir/tasks/<suite>/`` and loaded
with ``TaskManager(include_defaults=False)``, which starts in ~0 s and needs no network.
Registry task names need lm-eval's built-in index and the Hugging Face hub; when the hub
cannot be reached they come back as "unavailable" records instead of an error. Each task
runs in its own lm-eval call, so one broken task is recorded as "failed" and the rest run.

`SpeculativeLM` is an HFLM whose generation runs qspec's own speculative loop
(`qspec.engine.loop.generate`), and `lossless_check` evaluates one generate_until task twice
through it: target-only, then with a drafter. Greedy speculative decoding must not
change a single generated string, so the accuracies must be equal.

lm-eval is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from qspec.engine.sampling import GREEDY, Sampler, sampler_for
from qspec.suites.discovery import Suite, SuiteError
from qspec.suites.encoding import stop_ids
from qspec.suites.task_yaml import materialize_task_yaml, task_config

log = logging.getLogger(__name__)

SEED = 1234
HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
NOISY_LOGGERS = ("lm_eval", "lm-eval", "datasets", "evaluate")

__all__ = [
    "hub_reachable",
    "lossless_check",
    "quiet_lm",
    "run_tasks",
    "speculative_lm",
]


# ---------------------------------------------------------------- helpers


def _quiet_logging() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _silenced(name: str = "lm_eval") -> Iterator[None]:
    """Raise one logger to ERROR for a moment (HFLM warns on every in-memory model)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason). Fails fast: offline env vars, else one TCP connect to the hub.

    The connect (DNS included) runs in a daemon thread so a hanging resolver cannot
    hold the caller longer than `timeout`.
    """
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False, f"{var}={os.environ[var]} is set (offline mode)"
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection(HUB_HOST, timeout=timeout):
                result.append(None)
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return False, f"no answer from {HUB_HOST[0]}:{HUB_HOST[1]} within {timeout:g} s"
    if result[0] is not None:
        return False, f"cannot reach {HUB_HOST[0]}:{HUB_HOST[1]} ({result[0]})"
    return True, ""


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


def _error_text(exc: BaseException) -> str:
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


def _metric_records(results: dict, seconds: float) -> list[dict]:
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


def _local_tasks(suite: Suite, out_dir: Path) -> tuple[dict[str, Path], list[dict]]:
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
            failed.append(_record(path.stem, "failed", f"{path}: {_error_text(exc)}"))
    return found, failed


def _task_output_type(yaml_path: Path) -> str | None:
    try:
        return task_config(yaml_path).get("output_type")
    except SuiteError:
        return None


def _evaluate(lm, task: str, task_manager, *, limit, seed: int, log_samples: bool) -> dict:
    from lm_eval import simple_evaluate

    _quiet_logging()
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=task_manager,
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


# ---------------------------------------------------------------- lm-eval models


_CLASSES: dict[str, type] = {}


def _quiet_hflm_class() -> type:
    """HFLM without progress bars (lm-eval draws one per request type)."""
    if "quiet" not in _CLASSES:
        from lm_eval.models.huggingface import HFLM

        class QuietHFLM(HFLM):
            def loglikelihood(self, requests, disable_tqdm: bool = True):
                return super().loglikelihood(requests, disable_tqdm=True)

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

            def generate_until(self, requests, disable_tqdm: bool = True):
                return super().generate_until(requests, disable_tqdm=True)

        _CLASSES["quiet"] = QuietHFLM
    return _CLASSES["quiet"]


def quiet_lm(model, tokenizer):
    """lm-eval's HFLM around an in-memory model, batch size 1, no progress bars."""
    _quiet_logging()
    with _silenced():
        return _quiet_hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=1)


def _speculative_class() -> type:
    if "speculative" in _CLASSES:
        return _CLASSES["speculative"]

    from qspec.engine.loop import generate

    class SpeculativeLM(_quiet_hflm_class()):
        """HFLM whose generate_until runs qspec's speculative loop (batch size 1).

        drafter_factory() makes a fresh drafter per generation (drafters hold KV
        caches); None or gamma 0 is target-only decoding through the same loop.
        Greedy unless a task asks for do_sample with a positive temperature.
        `stats` accumulates steps, drafted and accepted tokens over all generations.
        """

        def __init__(
            self,
            pretrained,
            tokenizer,
            *,
            drafter_factory: Callable[[], object] | None = None,
            gamma: int = 0,
            seed: int = SEED,
            **kwargs,
        ) -> None:
            kwargs.setdefault("batch_size", 1)
            if kwargs["batch_size"] != 1:
                raise ValueError("SpeculativeLM decodes one sequence at a time: batch_size=1")
            _quiet_logging()
            with _silenced():
                super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
            self.drafter_factory = drafter_factory
            self.gamma = gamma if drafter_factory is not None else 0
            self.seed = seed
            self._generator: torch.Generator | None = None
            self._vocab_text: list[str] | None = None
            self._stop_ids: dict[tuple[str, ...], frozenset[int]] = {}
            self.stats = {
                "generations": 0,
                "tokens": 0,
                "steps": 0,
                "drafted": 0,
                "accepted": 0,
                "seconds": 0.0,
                "reruns": 0,
            }

        # Stop strings become token ids for the engine's eos_ids: a token whose own text
        # contains a stop string ends generation, as lm-eval's stopping criteria would.
        # A stop spanning two tokens ends it only at max_length; lm-eval cuts the text at
        # the first stop either way, so the returned string is the same.
        def _stops_as_ids(self, stops: tuple[str, ...]) -> frozenset[int]:
            if stops not in self._stop_ids:
                if self._vocab_text is None:
                    ids = [[i] for i in range(len(self.tokenizer))]
                    self._vocab_text = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                wanted = [s for s in stops if s]
                self._stop_ids[stops] = frozenset(
                    i for i, text in enumerate(self._vocab_text) if any(s in text for s in wanted)
                )
            return self._stop_ids[stops]

        def _eos_ids(self) -> frozenset[int]:
            eot = self.eot_token_id
            return stop_ids(self.tokenizer, self.model) | ({eot} if isinstance(eot, int) else set())

        def _sampler(self, kwargs: dict) -> Sampler:
            temperature = kwargs.get("temperature") or 0.0
            if not kwargs.get("do_sample") or temperature <= 0.0:
                return GREEDY
            if self._generator is None:
                self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
            return sampler_for(
                "sample",
                temperature=float(temperature),
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )

        def _run(self, prompt, sampler, max_new_tokens, eos_ids):
            drafter = self.drafter_factory() if self.drafter_factory and self.gamma else None
            gen = generate(
                self.model,
                prompt,
                drafter=drafter,
                gamma=self.gamma,
                sampler=sampler,
                max_new_tokens=max_new_tokens,
                eos_ids=eos_ids,
                generator=self._generator if not sampler.greedy else None,
            )
            self.stats["steps"] += len(gen.steps)
            self.stats["drafted"] += sum(s.drafted for s in gen.steps)
            self.stats["accepted"] += sum(s.accepted for s in gen.steps)
            self.stats["seconds"] += gen.total_s
            return gen.tokens

        def _model_generate(self, context, max_length: int, stop: list[str], **kwargs):
            if context.shape[0] != 1:
                raise ValueError("SpeculativeLM needs batch_size=1")
            mask = kwargs.pop("attention_mask", None)
            prompt = context[0]
            if mask is not None:
                prompt = prompt[mask[0].bool().to(prompt.device)]  # drop any padding
            max_new = max(int(max_length) - context.shape[1], 0)
            sampler = self._sampler(kwargs)
            stops = tuple(stop or ())
            eos = self._eos_ids()
            stop_ids = self._stops_as_ids(stops)
            tokens = self._run(prompt, sampler, max_new, eos | stop_ids) if max_new else []
            last = tokens[-1] if tokens else None
            if last is not None and last in stop_ids - eos and sampler.greedy:
                text = self.tok_decode(tokens)
                if not any(s and s in text for s in stops):
                    # The token's own text held a stop string but not in context (a
                    # tokenizer joining rule): decode without the early stop instead.
                    self.stats["reruns"] += 1
                    tokens = self._run(prompt, sampler, max_new, eos)
            self.stats["generations"] += 1
            self.stats["tokens"] += len(tokens)
            new = torch.tensor(tokens, dtype=context.dtype, device=context.device)
            return torch.cat([context[0], new]).unsqueeze(0)

    _CLASSES["speculative"] = SpeculativeLM
    return SpeculativeLM


def speculative_lm(
    model,
    tokenizer,
    *,
    drafter_factory: Callable[[], object] | None = None,
    gamma: int = 0,
    seed: int = SEED,
):
    """A SpeculativeLM around an in-memory target (see SpeculativeLM)."""
    return _speculative_class()(
        model, tokenizer, drafter_factory=drafter_factory, gamma=gamma, seed=seed
    )


def __getattr__(name: str):
    if name == "SpeculativeLM":  # built on first use so `import qspec.lmeval.harness` stays light
        return _speculative_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- public API


def _task_manager(include_path: Path, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    _quiet_logging()
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
) -> list[dict]:
    """Accuracy per task of an in-memory model: one record per (task, metric).

    Record keys: task, metric, value, stderr, n (docs evaluated), status ("ok",
    "failed", "unavailable"), error, and on ok records seconds (wall time of the
    task's lm-eval call), higher_is_better (lm-eval's, None if it gives none) and
    doc_scores ({doc_id: per-doc value}, empty for corpus-level metrics). `limit`
    caps the docs per task; `tasks` selects tasks by name; `lm` replaces the default
    HFLM wrapper (e.g. a SpeculativeLM).
    """
    work_dir = Path(work_dir)
    local, failures = _local_tasks(suite, work_dir / "tasks" / suite.name)
    registry = list(suite.task_names)
    if tasks is None:
        wanted, records = [*local, *registry], list(failures)
    else:  # only what was asked for is reported, including why a name is missing
        wanted, asked, records = [], list(dict.fromkeys(tasks)), []
        broken = "; ".join(r["error"] for r in failures)
        for name in asked:
            if name in local or name in registry:
                wanted.append(name)
            else:
                reason = f"task {name!r} is not in suite {suite.name!r}"
                if broken:
                    reason += f" (task files that failed to load: {broken})"
                records.append(_record(name, "failed", reason))
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
                managers[needs_hub] = _task_manager(work_dir / "tasks" / suite.name, needs_hub)
            if lm is None:
                lm = quiet_lm(model, tokenizer)
            # samples give per-doc scores for pairing variants; for tens of docs they cost ~0
            results = _evaluate(
                lm, name, managers[needs_hub], limit=limit, seed=seed, log_samples=True
            )
            got = _metric_records(results, time.perf_counter() - start)
            if not got:
                raise RuntimeError(f"lm-eval reported no metrics for {name!r}")
            records.extend(got)
        except Exception as exc:
            log.warning("task %s failed: %s", name, _error_text(exc))
            records.append(_record(name, "failed", _error_text(exc)))
    return records


def _first_metric(results: dict, task: str) -> tuple[str | None, float | None, int]:
    recs = [r for r in _metric_records(results, 0.0) if r["task"] == task]
    if not recs:
        return None, None, 0
    return recs[0]["metric"], recs[0]["value"], recs[0]["n"] or 0


def _outputs(results: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: list(s["filtered_resps"]) for s in results["samples"][task]}


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
) -> dict:
    """Evaluate one generate_until task target-only and speculatively; compare.

    Both runs go through SpeculativeLM (the same engine code), the first with no
    drafter. Returns {task, metric, accuracy_plain, accuracy_speculative, equal, n,
    outputs_identical, mismatched_docs, seconds_plain, seconds_speculative,
    acceptance (accepted / drafted), status, error}.
    """
    out = {
        "task": task,
        "metric": None,
        "accuracy_plain": None,
        "accuracy_speculative": None,
        "equal": None,
        "n": 0,
        "outputs_identical": None,
        "mismatched_docs": [],
        "gamma": gamma,
        "seconds_plain": None,
        "seconds_speculative": None,
        "acceptance": None,
        "status": "failed",
        "error": None,
    }
    work_dir = Path(work_dir)
    try:
        local, failures = _local_tasks(suite, work_dir / "tasks" / suite.name)
        if task in local:
            kind = _task_output_type(local[task])
            if kind != "generate_until":
                out["status"] = "unavailable"
                out["error"] = (
                    f"task {task!r} is {kind}: it generates nothing, so there is no "
                    "decoding to check (a generate_until task is needed)"
                )
                return out
            manager = _task_manager(work_dir / "tasks" / suite.name, False)
        elif task in suite.task_names:
            ok, reason = hub_reachable()
            if not ok:
                out["status"] = "unavailable"
                out["error"] = (
                    f"lm-eval registry task {task!r} needs the Hugging Face hub: {reason}"
                )
                return out
            manager = _task_manager(work_dir / "tasks" / suite.name, True)
        else:
            reasons = "; ".join(r["error"] for r in failures)
            out["error"] = f"task {task!r} is not in suite {suite.name!r}" + (
                f" (broken task files: {reasons})" if reasons else ""
            )
            return out

        runs = {}
        for label, factory, g in (("plain", None, 0), ("speculative", drafter_factory, gamma)):
            lm = speculative_lm(model, tokenizer, drafter_factory=factory, gamma=g, seed=seed)
            start = time.perf_counter()
            runs[label] = _evaluate(lm, task, manager, limit=limit, seed=seed, log_samples=True)
            out[f"seconds_{label}"] = round(time.perf_counter() - start, 3)
            if label == "speculative" and lm.stats["drafted"]:
                out["acceptance"] = lm.stats["accepted"] / lm.stats["drafted"]
        metric, plain, n = _first_metric(runs["plain"], task)
        _, spec, _ = _first_metric(runs["speculative"], task)
        a, b = _outputs(runs["plain"], task), _outputs(runs["speculative"], task)
        out.update(
            metric=metric,
            accuracy_plain=plain,
            accuracy_speculative=spec,
            equal=plain == spec,
            n=n,
            outputs_identical=a == b,
            mismatched_docs=sorted(d for d in set(a) | set(b) if a.get(d) != b.get(d)),
            status="ok",
        )
    except Exception as exc:
        log.warning("lossless check on %s failed: %s", task, _error_text(exc))
        out["status"], out["error"] = "failed", _error_text(exc)
    return out

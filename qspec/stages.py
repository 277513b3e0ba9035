"""The two measurement stages besides generation: the teacher-forced quality pass and task accuracy.

Both record one JSON line per result in the same store as the generation cells.
"""

from __future__ import annotations

import logging
import traceback

from qspec import store
from qspec.metrics import expected_acceptance_rate, expected_tau
from qspec.quality import quality_pass, tokenize_corpus

log = logging.getLogger("qspec")


def quality_records(state, suite, progress) -> list[dict]:
    """Quality per target variant vs the reference and predicted acceptance per (target, model draft)."""
    cfg = state.cfg
    q = cfg.quality
    models, names = {}, {}
    for precision in cfg.target.precisions:
        model, _ = state.model("target", precision)
        if model is not None:
            models[precision] = model
    same_model = state.draft_ref is not None and state.draft_ref.ref == state.target_ref.ref
    for precision in cfg.draft.precisions:
        model, _ = (
            state.model("draft", precision) if precision not in state.model_free else (None, None)
        )
        if model is not None:
            name = precision if same_model else f"draft:{precision}"
            names[precision] = name
            models.setdefault(name, model)
    reference = state.reference
    if reference not in models:
        return [
            {
                "kind": "quality",
                "suite": suite.name,
                "status": "failed",
                "error": f"reference variant {reference!r} was not built",
            }
        ]
    texts = suite.corpus()
    if not texts:
        return []
    ids = tokenize_corpus(state.tokenizer, texts, q.max_tokens)
    pairs = [(t, names[d]) for t in cfg.target.precisions if t in models for d in names]
    with progress.task(f"quality pass on {suite.name}", total=1) as advance:
        advance(f"{len(models)} variants, {q.max_tokens} tokens")
        result = quality_pass(
            models,
            reference,
            ids,
            window=q.window,
            stride=q.stride,
            sample=state.sampler("sample"),
            pairs=pairs,
            max_tokens=q.max_tokens,
        )
    records = []
    for name, stats in result.variants.items():
        if name not in cfg.target.precisions:
            continue
        info = state.variants.info.get((state.target_ref.ref, name), {})
        records.append(
            {
                "kind": "quality",
                "suite": suite.name,
                "variant": name,
                "reference": reference,
                "status": "ok",
                "error": None,
                "tokens": stats.get("positions"),
                "windows": result.windows,
                "weights_bytes": info.get("weights_bytes"),
                **stats,
                "kl_mean_se": stats.get("kl_se"),
                "rms_dp": stats.get("dp_rms"),
                "corpus": "suite corpus, teacher-forced, temperature 1",
            }
        )
    draft_name = {v: k for k, v in names.items()}
    for (target, draft), stats in result.pairs.items():
        predicted = {}
        for gamma in cfg.gammas:
            g, s = stats["alpha_predicted_greedy"], stats["alpha_predicted_sample"]
            predicted[str(gamma)] = {
                "tau": expected_tau(g, gamma),
                "acceptance_rate": expected_acceptance_rate(g, gamma),
                "tau_sample": expected_tau(s, gamma),
                "acceptance_rate_sample": expected_acceptance_rate(s, gamma),
            }
        records.append(
            {
                "kind": "pair_screen",
                "suite": suite.name,
                "target": target,
                "draft": draft_name[draft],
                "status": "ok",
                "error": None,
                **stats,
                "predicted": predicted,
                "sampling": cfg.sampling.model_dump(),
                "on": "suite corpus (teacher-forced)",
            }
        )
    return records


def run_quality(state, progress) -> None:
    if not state.cfg.quality.enabled or "target" in state.model_errors:
        return
    for suite in state.suites.values():
        key = store.cell_key({"kind": "quality", "suite": suite.name, **state.base_key()})
        if state.previous_ok(key):
            continue
        try:
            records = quality_records(state, suite, progress)
        except Exception as err:  # noqa: BLE001 - never lose the rest of the run
            log.debug(traceback.format_exc())
            records = [
                {
                    "kind": "quality",
                    "suite": suite.name,
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}",
                }
            ]
        for rec in records:
            state.write_stage(key, rec)


def run_task_stage(state, progress, work_dir) -> None:
    """lm-eval accuracy per target variant, then the greedy losslessness check through lm-eval."""
    if not state.cfg.tasks.enabled or "target" in state.model_errors:
        return
    from qspec.tasks import lossless_check, run_tasks

    cfg = state.cfg
    for suite in state.suites.values():
        if not (suite.task_files or suite.task_names):
            continue
        for precision in cfg.target.precisions:
            key = store.cell_key(
                {"kind": "task", "suite": suite.name, "variant": precision, **state.base_key()}
            )
            if state.previous_ok(key):
                continue
            model, problem = state.model("target", precision)
            if problem:
                state.write_stage(
                    key,
                    {
                        "kind": "task",
                        "suite": suite.name,
                        "variant": precision,
                        "status": problem[0],
                        "error": problem[1],
                    },
                )
                continue
            with progress.task(f"tasks {suite.name} {precision}", total=1) as advance:
                advance("lm-eval")
                try:
                    records = run_tasks(
                        model, state.tokenizer, suite, work_dir, limit=cfg.tasks.limit
                    )
                except Exception as err:  # noqa: BLE001
                    records = [
                        {"task": "*", "status": "failed", "error": f"{type(err).__name__}: {err}"}
                    ]
            for rec in records:
                state.write_stage(
                    key, {"kind": "task", "suite": suite.name, "variant": precision, **rec}
                )
        run_lossless_checks(state, suite, progress, work_dir, lossless_check)


def run_lossless_checks(state, suite, progress, work_dir, lossless_check) -> None:
    cfg = state.cfg
    if cfg.tasks.lossless_check == "none":
        return
    task = generative_task(suite)
    if task is None:
        return
    targets = cfg.target.precisions if cfg.tasks.lossless_check == "all" else [state.reference]
    gamma = max(cfg.gammas)
    for target in targets:
        model, problem = state.model("target", target)
        if problem:
            continue
        for draft in cfg.draft.precisions:
            key = store.cell_key(
                {
                    "kind": "task_lossless",
                    "suite": suite.name,
                    "target": target,
                    "draft": draft,
                    "gamma": gamma,
                    **state.base_key(),
                }
            )
            if state.previous_ok(key):
                continue
            rec = {
                "key": key,
                "kind": "task_lossless",
                "suite": suite.name,
                "target": target,
                "draft": draft,
                "gamma": gamma,
                "task": task,
            }
            drafter, problem = state.drafter(draft)
            if problem:
                state.write({**rec, "status": problem[0], "error": problem[1]})
                continue
            with progress.task(f"lossless {suite.name} {target}/{draft}", total=1) as advance:
                advance(task)
                try:
                    rec.update(
                        lossless_check(
                            model,
                            state.tokenizer,
                            suite,
                            work_dir,
                            drafter_factory=lambda d=draft: state.drafter(d)[0],
                            gamma=gamma,
                            task=task,
                            limit=cfg.tasks.limit,
                        )
                    )
                except Exception as err:  # noqa: BLE001
                    rec.update(status="failed", error=f"{type(err).__name__}: {err}")
            state.write(rec)


def generative_task(suite) -> str | None:
    """The first local generate_until task of the suite (multiple choice does not generate)."""
    from qspec.suites import task_config

    for path in suite.task_files:
        try:
            conf = task_config(path)
        except Exception:  # noqa: BLE001
            continue
        if conf.get("output_type") == "generate_until":
            return conf.get("task")
    return None

"""The page: every section built from one Run, rendered through the Jinja2 template into one
self-contained index.html. A section that fails to build says so; the rest of the page stands."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from jinja2 import Environment, PackageLoader

from qspec.report.analysis import Run
from qspec.report.budget import Budget
from qspec.report.format import FILTERS, text
from qspec.report.sections import (
    bandwidth,
    batch_invariance,
    breakdown,
    draft_acceptance,
    failures,
    heads,
    matrix,
    metadata,
    outputs,
    pareto,
    quality,
    response_times,
    served_engine,
    verdict,
)

log = logging.getLogger("qspec.report")

# (id, title, builder) in page order; the definitions are all template
SECTIONS = (
    ("verdict", "Verdict", verdict.build),
    ("matrix", "Pairing matrix", matrix.build),
    ("heads", "Draft heads", heads.build),
    ("quality", "Quality vs reference", quality.build),
    ("invariance", "Batch invariance", batch_invariance.build),
    ("pareto", "Speed, memory and quality", pareto.build),
    ("acceptance", "Acceptance", draft_acceptance.build),
    ("latency", "Latency", response_times.build),
    ("serving", "Served engine", served_engine.build),
    ("roofline", "Bandwidth roofline", bandwidth.build),
    ("breakdown", "Per suite and category", breakdown.build),
    ("definitions", "Definitions", None),
    ("metadata", "Run metadata", metadata.build),
    ("failures", "Failures and gaps", failures.build),
    ("outputs", "Generated text", outputs.build),
)


def _blank_none(value):
    """An optional field that is null prints nothing, as an absent one always did."""
    return "" if value is None else value


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("qspec", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_blank_none,
    )
    env.filters.update(FILTERS)
    return env


def build_context(run: Run) -> dict:
    ctx = {
        "title": f"qspec report: {run.dir.name}",
        "run_name": run.dir.name,
        "hardware_label": run.hardware_label,
        "is_cpu": run.is_cpu,
        "sections": [(sid, title) for sid, title, _ in SECTIONS],
        "errors": {},
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "status": text(run.info.status) or "unknown",
        "reference": run.reference,
        "budget": run.budget,
        "max_outputs": outputs.MAX_OUTPUT_PROMPTS,
    }
    for sid, _, builder in SECTIONS:
        if builder is None:
            continue
        try:
            ctx[sid] = builder(run)
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the report
            log.exception("report section %s failed", sid)
            ctx[sid] = None
            ctx["errors"][sid] = f"{type(err).__name__}: {err}"
    return ctx


def write_report(run_dir: Path, budget: Budget | None = None) -> Path:
    """Render run_dir/index.html from run_dir/run.json and run_dir/results.jsonl; return its path."""
    run_dir = Path(run_dir)
    ctx = build_context(Run(run_dir, budget))
    html = environment().get_template("report.html.j2").render(**ctx)
    out = run_dir / "index.html"
    tmp = out.with_name(".index.html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out

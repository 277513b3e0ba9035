"""One evaluation run: set up, run the stages in order, write every record they yield.

A cell that fails (a backend missing, out of memory, a model that will not load) is
stored as failed or unavailable with its reason and the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from qspec import store
from qspec.backends.vllm_probe import Probes
from qspec.config import RunConfig, resolve_defaults
from qspec.environment import describe, hardware, pick_device, quiet_transformers, versions
from qspec.eta import Eta
from qspec.keys import Finished
from qspec.measure.roofline import copy_bandwidth
from qspec.models.variants import Models
from qspec.plan import Cell, planned
from qspec.progress import Progress
from qspec.records import Record, RunInfo, parse
from qspec.stages import STAGES
from qspec.stages.context import RunContext


def run_evaluation(
    cfg: RunConfig,
    out: Path,
    suites: list,
    *,
    resume: bool = False,
    quiet: bool = False,
    fault: Callable[[Cell], None] | None = None,
    vllm_probes: Probes | None = None,
) -> int:
    """Run every stage; returns 0 when all records are ok or unavailable, 1 when any failed."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    device = pick_device(cfg.device)
    cfg = resolve_defaults(cfg, device.type)
    quiet_transformers()
    torch.manual_seed(cfg.seed)
    info = RunInfo(
        config=cfg.model_dump(),
        versions=versions(),
        hardware=hardware(device),
        hardware_label=describe(device),
        seed=cfg.seed,
        # the roofline's bound: what this device sustains, measured before any model loads
        memory_bandwidth=copy_bandwidth(device),
        suites=[s.name for s in suites],
        status="running",
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    store.write_json(out / "run.json", info.model_dump())
    finished, failed = _previous(results, resume), 0
    calibration = calibration_texts(suites)
    # the whole run's time left, from what this run measures as it goes (eta.py)
    eta = Eta(planned(cfg, [s.plan() for s in suites], device.type, info.versions), finished.stage)
    try:
        ctx = RunContext(
            cfg=cfg,
            device=device,
            suites={s.name: s for s in suites},
            work_dir=out,
            models=Models(cfg, device, calibration, corpus_texts(suites)),
            finished=finished,
            bandwidth=info.memory_bandwidth,
            fault=fault,
            vllm_probes=vllm_probes or Probes(),
        )
        progress = Progress(quiet=quiet, eta=eta)
        for record in _records(ctx, calibration, progress, info, out):
            failed += write(results, record)
            eta.seen(record)
        info.status = "complete" if not failed else "partial"
    except KeyboardInterrupt:
        info.status = "interrupted"
        raise
    finally:
        info.finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        info.timeline = eta.timeline
        info.cells_failed = failed
        store.write_json(out / "run.json", info.model_dump())
    return 1 if failed else 0


def _previous(results: Path, resume: bool) -> Finished:
    """On resume, what an earlier attempt stored; otherwise a clean results file."""
    if not resume:
        results.unlink(missing_ok=True)
        return Finished()
    return Finished([r for r in map(parse, store.read(results)) if r is not None])


def _records(ctx: RunContext, calibration, progress, info: RunInfo, out: Path):
    """Every stage's records: in this process, in order, or as Ray jobs in worker processes."""

    def started(executor: dict) -> None:
        info.executor = executor
        info.hardware_label = ctx.hardware_label
        store.write_json(out / "run.json", info.model_dump())

    if ctx.cfg.executor == "ray":
        from qspec.ray_executor import run_jobs

        ctx.vllm_probes.wait()  # workers time cells from the start
        yield from run_jobs(ctx, calibration, progress, started)
        # the served engine needs the machine to itself: after every worker is done
        yield from STAGES["serving"](ctx, progress)
        return
    started({"kind": "local", "concurrency": "one cell at a time, in one process"})
    for name, stage in STAGES.items():
        if name == "generation":  # timings need the machine: background probes end first
            ctx.vllm_probes.wait()
        yield from stage(ctx, progress)


def write(results: Path, record: Record) -> int:
    """Append one record; returns 1 when it is a failure (for the run's exit status)."""
    store.append(results, record.dump())
    return int(record.status == "failed")


# Text that GPTQ calibrates on and the layer-skip search scores. Little, because a CPU GPTQ
# build takes time in proportion (SmolLM2-135M: ~40 s + ~10 s per 1000 calibration tokens),
# and from the end of each corpus, because the quality pass scores its beginning: a variant
# is not judged on the text it was fitted to.
CALIBRATION_CHARS = 8000  # about 2000 tokens


def calibration_texts(suites) -> list[str]:
    out, left = [], CALIBRATION_CHARS
    for doc in (d for s in suites for d in reversed(_safe_corpus(s))):
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def corpus_texts(suites) -> list[str]:
    """Every suite's corpus text, in order: what the run's draft heads train on."""
    return [doc for s in suites for doc in _safe_corpus(s)]


def _safe_corpus(suite) -> list[str]:
    try:
        return list(suite.corpus())
    except Exception:  # noqa: BLE001 - calibration text is optional
        return []

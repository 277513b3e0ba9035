"""executor = "ray": the run's jobs (jobs.py) as Ray tasks, each in a worker process of its own.

Ray does the scheduling; qspec only says what each job asks for (CPUs, or a GPU or a share
of one) and that a worker serves one job and exits (max_calls=1), so a cell group's peak
memory is its own. Workers stream their records back as they finish them and the driver
writes them through the same store as a local run, so --resume works whichever executor
wrote a record. A worker that dies fails only its own job's unfinished records; a job is
never retried, since a retried measurement would hide the fault.

The cluster: `ray.address` in the config or $RAY_ADDRESS joins an existing one (qspec must
be installed on its nodes); otherwise a local cluster of `ray.num_cpus` CPUs is started
here and stopped at the end of the run.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator

from qspec.jobs import Job, jobs, lost_records
from qspec.plan import planned
from qspec.records import Record, parse
from qspec.stages.context import RunContext

log = logging.getLogger("qspec")

# passed on to workers of an existing cluster (a local cluster's workers inherit them)
ENV_VARS = (
    "QSPEC_CACHE",
    "QSPEC_CACHE_MAX_GB",
    "QSPEC_SUITES_PATH",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "GPTQMODEL_CPU_WORKERS",
)


def run_jobs(ctx: RunContext, calibration: list[str], progress, started) -> Iterator[Record]:
    """Every record of the run, as the workers send them back: the build job first, then
    every other job at once, as many at a time as the cluster has room for. `started` gets
    the executor's description (for run.json) once the cluster is up."""
    import ray

    connected = _connect(ctx.cfg.ray)
    try:
        ctx.concurrency = describe_cluster(ctx)
        started(executor_info(ctx))
        first, rest = jobs(ctx.cfg)
        with progress.task("ray jobs", total=1 + len(rest)) as advance:
            for rec in _run(ctx, [first], calibration, advance):
                if rec.kind == "variant" and rec.batch_invariance is not None:
                    ctx.invariance[(rec.model, rec.precision)] = rec.batch_invariance
                yield rec
            yield from _run(ctx, rest, calibration, advance)
    finally:
        if connected:
            ray.shutdown()


def executor_info(ctx: RunContext) -> dict:
    """What run.json says of how the cells ran."""
    import ray

    s = ctx.cfg.ray
    per_job = {"num_gpus": s.gpus_per_group} if ctx.device.type == "cuda" else {}
    return {
        "kind": "ray",
        "address": s.address or os.environ.get("RAY_ADDRESS") or "local cluster",
        "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        "per_job": {"num_cpus": s.cpus_per_group, **per_job},
        "concurrency": ctx.concurrency,
    }


def describe_cluster(ctx: RunContext) -> str:
    """The label every timing cell carries: what it shared the machine with."""
    import ray

    s = ctx.cfg.ray
    cpus = ray.cluster_resources().get("CPU", 0)
    if ctx.device.type == "cuda":
        gpus = ray.cluster_resources().get("GPU", 0)
        at_once = int(gpus / s.gpus_per_group) if gpus else 0
        share = f"{s.gpus_per_group:g} GPU"
    else:
        at_once = int(cpus / s.cpus_per_group)
        share = f"{s.cpus_per_group:g} CPU"
    return (
        f"Ray worker process ({share} of a {cpus:g}-CPU cluster); up to {at_once} jobs "
        "ran at once, so concurrent jobs shared the machine"
    )


def _connect(settings) -> bool:
    """Join the configured cluster, or start a local one; True when this run connected (and
    so disconnects at the end, which stops a cluster it started)."""
    import ray

    if ray.is_initialized():
        return False
    address = settings.address or os.environ.get("RAY_ADDRESS")
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env}, **common)
        return True  # shutdown() only disconnects from a cluster qspec did not start
    # Ray starts workers at niceness 15, behind its own daemons: these workers are timing cells
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=settings.num_cpus or os.cpu_count(), **common)
    return True


def _options(ctx: RunContext) -> dict:
    s = ctx.cfg.ray
    opts = dict(num_cpus=s.cpus_per_group, max_calls=1, max_retries=0, num_returns="streaming")
    if ctx.device.type == "cuda":
        opts["num_gpus"] = s.gpus_per_group
    return opts


def _run(ctx: RunContext, todo: list[Job], calibration: list[str], advance) -> Iterator[Record]:
    """Run the jobs at once; yield their records as they come, then any a dead worker lost."""
    import ray

    work = ray.remote(**_options(ctx))(work_in_worker)
    threads = max(1, int(ctx.cfg.ray.cpus_per_group)) if ctx.device.type == "cpu" else None
    inbox: queue.Queue = queue.Queue()
    args = dict(
        cfg=ctx.cfg,
        device=ctx.device.type,
        suites=list(ctx.suites.values()),
        work_dir=str(ctx.work_dir),
        finished=ctx.finished,
        invariance=dict(ctx.invariance),
        bandwidth=ctx.bandwidth,
        fault=ctx.fault,
        calibration=calibration,
        threads=threads,
        concurrency=ctx.concurrency,
    )

    def follow(job: Job) -> None:
        """Pass each record of one job to the driver; at the end, None or why it died."""
        try:
            for ref in work.remote(job=job, **args):
                inbox.put((job, ray.get(ref)))
            inbox.put((job, None))
        except Exception as err:  # noqa: BLE001 - a dead worker, a fault in the job
            what = "worker died" if isinstance(err, _deaths()) else "job failed"
            inbox.put((job, f"{job.label()}: {what}: {type(err).__name__}: {err}"[:2000]))

    for job in todo:
        threading.Thread(target=follow, args=(job,), daemon=True).start()
    written: dict[Job, set[str]] = {job: set() for job in todo}
    count = dict.fromkeys(todo, 0)
    running = len(todo)
    while running:
        job, item = inbox.get()
        if isinstance(item, dict):
            rec = parse(item)
            if rec is not None:
                written[job].update(k for k in (rec.key, rec.stage_key) if k)
                count[job] += 1
                yield rec
            continue
        running -= 1
        advance(f"{job.label()} {'done' if item is None else 'died'} ({count[job]} records)")
        if item is not None:
            log.warning(item)
            yield from _lost(ctx, job, written[job], item)


def _deaths() -> tuple[type, ...]:
    """Ray's errors for a worker process (or its node) that is gone, killed or out of memory."""
    from ray import exceptions as e

    names = ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "ActorDiedError")
    return tuple(getattr(e, n) for n in names if hasattr(e, n))


def _lost(ctx: RunContext, job: Job, written: set[str], reason: str) -> list[Record]:
    suites = [s.plan() for s in ctx.suites.values()]
    everything = planned(ctx.cfg, suites, ctx.device.type, ctx.versions)
    return lost_records(job, everything, written, ctx.finished, reason)


def work_in_worker(
    *,
    job: Job,
    cfg,
    device: str,
    suites: list,
    work_dir: str,
    finished,
    invariance: dict,
    bandwidth,
    fault,
    calibration: list[str],
    threads: int | None,
    concurrency: str | None,
):
    """One job in its own process: a RunContext of its own, the stage's records as dicts."""
    import torch

    from qspec.environment import quiet_transformers
    from qspec.models.variants import Models
    from qspec.progress import Progress
    from qspec.runner import corpus_texts
    from qspec.stages import STAGES

    if threads is not None:
        torch.set_num_threads(threads)
    quiet_transformers()
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    ctx = RunContext(
        cfg=cfg,
        device=dev,
        suites={s.name: s for s in suites},
        work_dir=_writable(work_dir),
        models=Models(cfg, dev, calibration, corpus_texts(suites)),
        finished=finished,
        bandwidth=bandwidth,
        fault=fault,
        targets=(job.target,) if job.target is not None else None,
        invariance=invariance,
        concurrency=concurrency,
    )
    if job.stage == "generation":
        from qspec.stages.generation import build_group_models

        runtime = ctx.memory.peak()[0]  # the Python, torch and library runtime, no model yet
        build_group_models(ctx, job.target)
        note = (
            f", from when its models were built (builds excluded; the runtime of "
            f"{runtime / 2**20:.0f} MiB before any model loaded included)"
        )
        ctx.memory.restart_process(note)
    for rec in STAGES[job.stage](ctx, Progress(quiet=True)):
        yield rec.dump()


def _writable(path: str):
    """The run folder where the worker can write to it (same machine), else a temporary one."""
    import tempfile
    from pathlib import Path

    p = Path(path)
    if p.is_dir() and os.access(p, os.W_OK):
        return p
    return Path(tempfile.mkdtemp(prefix="qspec-worker-"))

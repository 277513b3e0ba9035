"""Stage 4: the same pairings served by vLLM, across concurrency levels, beside qspec's loop.

Per suite and served target, one server per pairing (the target alone, each draft) is started
from vLLM's own venv and kept up while the sweep runs; each repeat runs every concurrency
level on every server in turn, so that drift of the machine hits the target alone and each
pairing alike and each speedup is a set of per-repeat ratios (measure/concurrency.py).
A server that will not start, or dies, fails only its own cells, with its last log lines.

On a CUDA device qspec's own models are released first (the tasks stage builds them again
when it needs them), and each server gets a --gpu-memory-utilization computed from what it
needs (ServerSpec.gpu_bytes). Servers that fit 0.9 of the GPU together are all up during the
sweep, started one after another (vLLM sizes its KV cache from whole-device free memory, and
another server loading at the same moment would be charged to it); servers that do not fit
run one at a time (_sweep_one_at_a_time; the arithmetic is in serving_gpu.py). On a CPU the servers start at once, as before.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

from qspec.backends.vllm_api import deployment_pairing, deployment_version
from qspec.backends.vllm_load import Level, run_level, schedule
from qspec.backends.vllm_metrics import SpecCounters, read_counters, requests_in_flight
from qspec.backends.vllm_server import (
    Server,
    ServerError,
    ServerSpec,
    root_cause,
    vllm_python,
)
from qspec.keys import key_of_serving
from qspec.plan import ServingCell, serving_plan
from qspec.records import ServingRecord, Skip
from qspec.stages.context import RunContext
from qspec.stages.serving_figures import level_records
from qspec.stages.serving_gpu import ONE_AT_A_TIME, plan_launch
from qspec.stages.serving_spec import server_spec
from qspec.suites.encoding import encode_prompts, stop_ids

log = logging.getLogger("qspec")


@dataclass
class Served:
    """One pairing's server during a sweep, and everything measured on it so far."""

    draft: str | None
    cells: list[ServingCell]
    spec: ServerSpec | None = None
    server: Server | None = None
    status: str = "ok"
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    startup_s: float | None = None
    stop: list[int] = field(default_factory=list)  # token ids that end a request (read once)
    levels: dict[tuple[str, int], list[Level]] = field(default_factory=dict)
    counters: dict[tuple[str, int], SpecCounters] = field(default_factory=dict)
    # modes this pairing is not measured in, and why (vLLM's own defect on this device)
    refused: dict[str, str] = field(default_factory=dict)
    # the target alone: qspec's own loop on the same prompts, greedy, one request at a time,
    # timed between this server's repeats at the lowest level (repeat -> (tokens, seconds))
    qspec_loop: dict[int, tuple[int, float]] = field(default_factory=dict)
    qspec_numerics: str | None = None  # how qspec's loop computed the target (native or a format's)

    def fail(self, status: str, error: str, log_tail: list[str] | None = None) -> None:
        self.status, self.error = status, error
        self.log_tail = log_tail or (self.server.log_tail() if self.server else [])
        if self.server is not None:
            self.server.stop()


def serving_stage(ctx: RunContext, progress) -> Iterator[ServingRecord]:
    cells = serving_plan(ctx.cfg, list(ctx.suites))
    keys = {c: key_of_serving(c, ctx.cfg, ctx.device.type, ctx.versions) for c in cells}
    todo = [c for c in cells if ctx.finished.cell(keys[c]) is None]
    if not todo:
        return
    v = ctx.cfg.vllm
    if v.url is None:
        found = ctx.vllm_probes.probe(vllm_python(v.python))
        if found.problem:
            for c in todo:
                yield ServingRecord(
                    key=keys[c], **c.coordinates(), status="unavailable", error=found.problem
                )
            return
        version = found.version
    else:
        version = deployment_version(v.url, _address(ctx, None)[2])
    targets = list(dict.fromkeys((c.suite, c.target) for c in todo))
    # progress counts the sweeps as they start (the records come at a target's end, together)
    sweeps = len(targets) * len(v.modes) * v.repeats * len(v.concurrency)
    with progress.task("vllm sweeps", total=sweeps) as advance:
        for suite, target in targets:
            group = [c for c in cells if (c.suite, c.target) == (suite, target)]
            for rec in _measure_target(ctx, suite, target, group, set(todo), version, advance):
                rec.key = keys[_cell_of(rec, group)]
                yield rec


def _cell_of(rec: ServingRecord, group: list[ServingCell]) -> ServingCell:
    coords = (rec.draft, rec.mode, rec.concurrency)
    return next(c for c in group if (c.draft, c.mode, c.concurrency) == coords)


def _measure_target(ctx: RunContext, suite: str, target: str, group, todo: set, version, advance):
    """One target's servers: the target alone (always: every speedup pairs with it) and each
    pairing with a cell still to measure; up together and alternated level by level, or, on a
    GPU they do not fit together, one at a time (serving_gpu.plan_launch)."""
    v = ctx.cfg.vllm
    prompts = _prompts(ctx, suite)
    by_draft: dict[str | None, list[ServingCell]] = {}
    for c in group:
        by_draft.setdefault(c.draft, []).append(c)
    served = [
        Served(d, cs, refused=refused_modes(ctx, d))
        for d, cs in by_draft.items()
        if d is None or any(c in todo for c in cs)
    ]
    launch = None
    try:
        for s in served:
            _guarded(_prepare, ctx, s, target, prompts)
        launch = plan_launch(ctx, served)
        if launch == ONE_AT_A_TIME:
            _sweep_one_at_a_time(ctx, served, prompts, advance)
        else:
            _start_together(ctx, served, prompts)
            for mode in v.modes:
                for repeat in range(v.repeats):
                    for level in v.concurrency:
                        advance(f"{target} {mode} c={level}, repeat {repeat + 1}/{v.repeats}")
                        for s in served:
                            if s.status == "ok":
                                _sweep(ctx, s, mode, level, repeat, prompts)
                        if mode == "greedy" and level == min(v.concurrency):
                            _qspec_alone(ctx, served[0], target, repeat, prompts)
    finally:
        for s in served:
            if s.server is not None:
                s.server.stop()
    base = served[0] if served[0].draft is None else None
    meta = {"engine_version": version, "hardware": ctx.hardware_label, "reference": ctx.reference}
    meta["launch"] = launch
    for s in served:
        try:
            yield from level_records(ctx, s, base, prompts, meta)
        except Exception as err:  # noqa: BLE001 - a fault in one pairing never loses the others
            log.debug(traceback.format_exc())
            for c in s.cells:
                yield ServingRecord(**c.coordinates(), status="failed", error=f"{err}", **meta)


def _prompts(ctx: RunContext, suite: str) -> list:
    """The suite's prompts as the qspec cells decode them: token ids, per-prompt token caps."""
    if "target" in ctx.models.errors:
        return []
    limit = ctx.cfg.vllm.max_prompts or ctx.cfg.max_prompts
    return encode_prompts(
        ctx.models.tokenizer,
        ctx.suites[suite].prompts,
        limit,
        ctx.cfg.max_new_tokens,
        "cpu",
    )


def _prepare(ctx: RunContext, s: Served, target: str, prompts) -> None:
    """What one pairing's server is to serve (or the configured deployment's stop tokens)."""
    if not prompts:
        raise Skip("unavailable", "no prompts to serve (the suite declares none)")
    if s.refused and set(ctx.cfg.vllm.modes) <= set(s.refused):  # nothing left to measure
        raise Skip("unavailable", next(iter(s.refused.values())))
    if ctx.cfg.vllm.url is not None:
        s.server, s.stop = None, _stop(ctx, s)
        return
    s.spec = server_spec(ctx, target, s.draft, prompts)
    s.stop = _stop(ctx, s)


def _launch(ctx: RunContext, s: Served) -> None:
    """Start one pairing's server (nothing for a configured deployment)."""
    if s.spec is not None:
        s.server = Server(s.spec, ctx.work_dir / "vllm" / f"{s.spec.name}.log")


def _start_together(ctx: RunContext, served: list[Served], prompts) -> None:
    """Every server up for the whole sweep. On a CPU launched at once, then waited for (a
    server's start is mostly its own imports and loading, which overlap on two cores); on a GPU
    each is waited for before the next starts: vLLM sizes its KV cache from the device's free
    memory, and what another server allocates meanwhile would be counted as its own."""
    if ctx.device.type == "cuda":
        for s in served:
            _guarded(_launch, ctx, s)
            _guarded(_ready, ctx, s, prompts)
        return
    for s in served:
        _guarded(_launch, ctx, s)
    for s in served:
        _guarded(_ready, ctx, s, prompts)


def _sweep_one_at_a_time(ctx: RunContext, served: list[Served], prompts, advance) -> None:
    """Servers that do not fit the GPU together: per repeat, each server is started, warmed,
    swept over every mode and level, and stopped before the next one starts.

    The speedup still pairs repeat i of a pairing with repeat i of the target alone, but the
    two passes are a server's whole sweep apart (plus a start), not one level apart as when
    the servers are up together: drift slower than a repeat still cancels, faster drift less.
    The order reverses every other repeat (target alone, pairings; pairings reversed, target
    alone; ...), so that a drift linear in time hits both sides alike, and the server last in
    one repeat stays up as the first of the next (one start saved per repeat)."""
    v = ctx.cfg.vllm
    up: Served | None = None
    for repeat in range(v.repeats):
        order = served if repeat % 2 == 0 else served[::-1]
        for n, s in enumerate(order):
            if s.status != "ok":
                continue
            if up is not s:
                if up is not None and up.server is not None:
                    up.server.stop()  # its memory back before the next one sizes its cache
                up = s
                _guarded(_launch, ctx, s)
                _guarded(_ready, ctx, s, prompts)
            for mode in v.modes:
                for level in v.concurrency:
                    if n == 0:  # a sweep's progress: counted with its first server
                        advance(f"{mode} c={level}, repeat {repeat + 1}/{v.repeats} (in turn)")
                    if s.status == "ok":
                        _sweep(ctx, s, mode, level, repeat, prompts)


def _ready(ctx: RunContext, s: Served, prompts) -> None:
    """Wait until a launched server answers, then warm it up."""
    if s.server is not None:
        s.startup_s = s.server.wait_healthy(ctx.cfg.vllm.startup_timeout_s)
        _warm(ctx, s, prompts)


def _guarded(step, ctx: RunContext, s: Served, *args) -> None:
    """One start-up step of a pairing still ok; a fault is that pairing's status."""
    if s.status != "ok":
        return
    try:
        step(ctx, s, *args)
    except Skip as skip:
        s.fail(skip.status, skip.reason)
    except ServerError as err:
        s.fail("unavailable" if err.refused else "failed", str(err), err.log_tail)
    except Exception as err:  # noqa: BLE001
        log.debug(traceback.format_exc())
        s.fail("failed", f"{type(err).__name__}: {err}")


def _warm(ctx: RunContext, s: Served, prompts) -> None:
    """One short request per server before timing: the first forward pays one-off setup."""
    requests = schedule(_pairs(prompts[:1], 4), 1, 1, None)
    level = run_level(s.server.url, s.spec.name, requests, 1, s.stop)
    bad = [r.error for r in level.results if not r.ok]
    if bad:  # the engine's own first error says why (a kernel it lacks here: unavailable)
        cause, refused = root_cause(s.server.log_path)
        why = f"warm-up request failed: {bad[0]}" + (f"; vLLM: {cause}" if cause else "")
        raise ServerError(why, s.server.log_tail(), refused)


def _pairs(prompts, cap: int | None = None) -> list[tuple[list[int], int]]:
    return [(p.ids.tolist(), min(p.max_new_tokens, cap or p.max_new_tokens)) for p in prompts]


def _stop(ctx: RunContext, s: Served) -> list[int]:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(s.spec.model) if s.spec else None
    except OSError:
        gen = None
    return sorted(stop_ids(ctx.models.tokenizer, SimpleNamespace(generation_config=gen)))


def refused_modes(ctx: RunContext, draft: str | None) -> dict[str, str]:
    """Modes a pairing is not measured in on this vLLM, and why: known defects of its CPU
    build, probed at the start (vllm_probe.VERSION_PROBE), never of a target alone."""
    if draft is None or ctx.cfg.vllm.url is not None:
        return {}
    found = ctx.vllm_probes.probe(vllm_python(ctx.cfg.vllm.python))
    if found.no_sampled_spec:
        return {"sample": found.no_sampled_spec}
    if found.no_top_k_spec and ctx.cfg.sampling.top_k > 0:
        return {"sample": found.no_top_k_spec}
    return {}


def _sweep(ctx: RunContext, s: Served, mode: str, level: int, repeat: int, prompts) -> None:
    """One level on one server: the counters read around its requests."""
    if mode in s.refused:
        return
    v = ctx.cfg.vllm
    cell = next(c for c in s.cells if (c.mode, c.concurrency) == (mode, level))
    url, name, headers = _address(ctx, s)
    try:
        if ctx.fault is not None:
            ctx.fault(cell)
        sampling = None if mode == "greedy" else _sampling(ctx)
        seed = None if mode == "greedy" else ctx.cfg.seed + 1000 * repeat
        requests = schedule(_pairs(prompts), level, v.requests_per_slot, seed)
        before = read_counters(url, headers)
        done = run_level(url, name, requests, level, s.stop, sampling, headers, v.request_timeout_s)
        _settle(url, headers)
        delta = read_counters(url, headers) - before
    except Exception as err:  # noqa: BLE001 - a server that stopped answering
        log.debug(traceback.format_exc())
        return s.fail("failed", _death(s, mode, level, repeat, f"{type(err).__name__}: {err}"))
    if s.server is not None and not s.server.alive():
        return s.fail("failed", _death(s, mode, level, repeat, "the server exited"))
    if all(not r.ok for r in done.results):
        return s.fail("failed", _death(s, mode, level, repeat, done.results[0].error))
    s.levels.setdefault((mode, level), []).append(done)
    s.counters[(mode, level)] = s.counters.get((mode, level), SpecCounters()) + delta


def _qspec_alone(ctx: RunContext, s: Served, target: str, repeat: int, prompts) -> None:
    """qspec's own loop over the same prompts, the target alone, greedy, between vLLM's passes
    at one request: the two engines timed in one stretch of time (qspec / vLLM at c = 1). On
    a CPU only: on a GPU qspec's models were released for the servers."""
    if s.draft is not None or s.status != "ok" or ctx.device.type != "cpu" or ctx.cfg.vllm.url:
        return
    from qspec.engine.loop import generate

    try:
        model = ctx.models.model("target", target)
        eos = frozenset(s.stop)
        tokens = seconds = 0
        for p in prompts:
            g = generate(model, p.ids, max_new_tokens=p.max_new_tokens, eos_ids=eos)
            tokens, seconds = tokens + len(g.tokens), seconds + g.total_s
        s.qspec_loop[repeat] = (tokens, seconds)
        s.qspec_numerics = (getattr(model, "qspec_format", None) or {}).get("numerics", "native")
    except Exception as err:  # noqa: BLE001 - a missing comparison never costs the sweep
        log.warning("qspec's loop beside vLLM failed for %s: %s", target, err)


def _death(s: Served, mode: str, level: int, repeat: int, why: str | None) -> str:
    code = s.server.proc.poll() if s.server is not None else None
    exit_note = f" (exit code {code})" if code is not None else ""
    return (
        f"vLLM server {s.spec.name if s.spec else 'deployment'!r} stopped answering at "
        f"concurrency {level}, {mode}, repeat {repeat}{exit_note}: {why}"
    )


def _settle(url: str, headers, timeout_s: float = 30) -> None:
    """Wait until the engine has no request left, so the counters include the whole level."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and requests_in_flight(url, headers) > 0:
        time.sleep(0.2)
    time.sleep(0.3)  # the counters are updated by the engine's stats loop, a moment after


def _sampling(ctx: RunContext) -> dict:
    s = ctx.cfg.sampling
    return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k if s.top_k > 0 else -1}


def _address(ctx: RunContext, s: Served | None) -> tuple[str, str | None, dict | None]:
    """(url, served model name, headers) of a pairing's server or the existing deployment."""
    v = ctx.cfg.vllm
    if v.url is None:
        return s.server.url, s.spec.name, None
    key = os.environ.get(v.api_key_env) if v.api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else None
    model = deployment_pairing(v.url, headers)["model"] if s is not None else None
    return v.url, model, headers

"""How one target's vLLM servers share a device: on a CUDA GPU, each server's
--gpu-memory-utilization from what it needs, and whether they fit to run together or must run
one at a time; qspec's own models are released first. On a CPU they all start together
(VLLM_CPU_KVCACHE_SPACE sizes each server's cache)."""

from __future__ import annotations

import gc
import logging

from qspec.stages.context import RunContext

log = logging.getLogger("qspec")

TOGETHER, ONE_AT_A_TIME = "together", "one at a time"
GPU_SHARE = 0.9  # of the device's memory, at most, for the servers of one target together
GIB = 1 << 30


def plan_launch(ctx: RunContext, served: list, memory=None) -> str | None:
    """How this target's servers start: "together" or "one at a time" (None: a deployment).
    On a CUDA device, qspec's own models are released first and each server gets its
    --gpu-memory-utilization; `memory` is (free, total) bytes of the device, read from
    torch.cuda.mem_get_info when None (tests pass it)."""
    v = ctx.cfg.vllm
    if v.url is not None:
        return None
    if ctx.device.type != "cuda":
        return TOGETHER  # VLLM_CPU_KVCACHE_SPACE sizes a CPU server's cache, as before
    release_models(ctx)
    if memory is None:
        import torch

        memory = torch.cuda.mem_get_info(ctx.device)
    free, total = memory
    specs = [s.spec for s in served if s.status == "ok" and s.spec is not None]
    margin = int(v.gpu_margin_gib * GIB)
    needs = []
    for spec in specs:
        try:
            needs.append(spec.gpu_bytes(max(v.concurrency), margin))
        except (OSError, ValueError, KeyError, TypeError) as err:  # no readable config.json
            log.warning("cannot size the GPU memory of %s: %s", spec.name, err)
            needs.append(None)
    fractions, launch = gpu_plan(needs, free, total, v.gpu_memory_utilization)
    for spec, fraction in zip(specs, fractions, strict=True):
        spec.gpu_memory_utilization = fraction
    return launch


def gpu_plan(
    needs: list[int | None], free: int, total: int, configured: float | None = None
) -> tuple[list[float | None], str]:
    """Each server's --gpu-memory-utilization (its need in bytes over the device's total
    memory, rounded up to 0.001, at most GPU_SHARE; or the configured fraction) and whether
    they launch together: when their fractions add up to no more than GPU_SHARE of the device
    and to no more than what is free (vLLM refuses to start when its share is not free). A
    need not known (None) leaves vLLM's default share (0.9), which shares with nothing."""

    def fraction(need: int | None) -> float | None:
        if configured is not None or need is None:
            return configured
        return min(GPU_SHARE, -(-need * 1000 // total) / 1000)  # exact integer ceiling

    fractions = [fraction(need) for need in needs]
    room = min(GPU_SHARE * total, free)
    known = all(f is not None for f in fractions)
    together = len(fractions) <= 1 or (known and sum(fractions) * total <= room)
    return fractions, TOGETHER if together else ONE_AT_A_TIME


def release_models(ctx: RunContext) -> None:
    """qspec's built models (and their compiled steps) off the GPU before vLLM's servers
    start; the tasks stage builds what it needs again."""
    ctx.compiled_models.clear()
    released = ctx.models.release()
    gc.collect()
    if released:
        log.info("released %d built model(s) from the GPU for the served engine", len(released))

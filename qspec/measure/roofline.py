"""The memory-bandwidth bound on decoding, and how close each step comes to it.

A decode step must read every weight once, so bytes_of_weights / copy_bandwidth is the
fastest a step can be. The copy bandwidth is measured on the run's own device at the
start of the run (a large device-to-device copy, counting bytes read plus written), so
the fraction compares the engine with what this hardware actually sustains.
"""

from __future__ import annotations

import statistics
import time

import torch

from qspec.engine.loop import sync
from qspec.measure.stats import percentile


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, samples: int = 7) -> dict:
    """Median GB/s (1e9 bytes) of copying an nbytes buffer, read plus write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page faults and allocator, not counted
    seconds = []
    for _ in range(samples):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        seconds.append(time.perf_counter() - t)
    del src, dst
    return {
        "copy_gbps": 2 * nbytes / statistics.median(seconds) / 1e9,
        "buffer_bytes": nbytes,
        "samples": samples,
        "device": device.type,
        "method": (
            f"median of {samples} torch copy_ calls of a {nbytes >> 20} MiB fp32 buffer on the "
            "run's device, counting bytes read plus bytes written"
        ),
    }


def read_bandwidth(device: torch.device, nbytes: int = 256 << 20, samples: int = 7) -> dict:
    """Median GB/s of reading an nbytes buffer once (a sum over it): the bound of a decode
    step, which reads its weights and writes almost nothing. On some machines it is well
    above the copy bandwidth (a copy also writes, and allocates the lines it writes)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    src.sum()  # warm-up
    seconds = []
    for _ in range(samples):
        sync(device)
        t = time.perf_counter()
        src.sum()
        sync(device)
        seconds.append(time.perf_counter() - t)
    del src
    return {
        "read_gbps": nbytes / statistics.median(seconds) / 1e9,
        "read_method": f"median of {samples} sums over a {nbytes >> 20} MiB fp32 buffer",
    }


def roofline(
    kind: str, bytes_per_step: int | None, step_seconds: list[float], bandwidth
) -> dict | None:
    """Achieved weight-read bandwidth of the median step, and its fraction of the measured copy bandwidth."""
    if not bytes_per_step or not step_seconds or not bandwidth:
        return None
    p50 = percentile(step_seconds, 50)
    achieved = bytes_per_step / p50 / 1e9
    return {
        "kind": kind,
        "bytes_per_step": bytes_per_step,
        "step_s_p50": p50,
        "step_samples": len(step_seconds),
        "achieved_gbps": achieved,
        "bandwidth_gbps": bandwidth["copy_gbps"],
        "fraction": achieved / bandwidth["copy_gbps"],
    }

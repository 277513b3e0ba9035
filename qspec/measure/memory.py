"""Peak memory of one cell: its own models' weights plus what its generations add on top.

In a local run every built variant stays resident, so the process peak is the same for every
cell. A cell's own figure is the bytes of its target and draft weights as built plus the
largest rise of memory during any one of its generations (KV caches, activations,
temporaries): CUDA allocator figures on GPU, the resident set (VmRSS / VmHWM) on CPU.
Where a process serves one cell group only (a Ray worker), its whole peak is the group's
own too (process_peak).
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

# The highest mark seen before any reset_peak: resets restart the kernel's and the
# allocator's high-water marks, and the process's peak must survive them.
_high_water = 0
_peak_note = ""


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> int:
    """Restart the high-water mark; returns the bytes resident now (the rise is measured from here)."""
    global _high_water
    _high_water = max(_high_water, peak_bytes(device)[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:  # Linux: "5" resets the VmHWM high-water mark of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS") or 0


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the high-water mark since the last reset_peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm, "peak RSS of the process (VmHWM, reset per generation)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS since process start"


def restart_process_peak(device: torch.device, note: str) -> None:
    """Start the process's peak afresh (after a worker has built its group's models: the
    transients of loading and quantizing are not the group's serving footprint)."""
    global _high_water, _peak_note
    if device.type == "cpu":
        _release_free_heap()
    reset_peak(device)
    _high_water, _peak_note = 0, note


def _release_free_heap() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): quantizing a model on load
    frees hundreds of MiB that would stay in the resident set (nf4 of SmolLM2-135M: 1215 MiB
    resident after the build, 903 MiB after this)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure keeps what the allocator holds
        pass


def process_peak(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): this process's peak since restart_process_peak, with every
    per-generation reset in between included."""
    peak = max(peak_bytes(device)[0], _high_water)
    what = "CUDA allocator peak" if device.type == "cuda" else "peak RSS"
    return peak, f"{what} of the worker process that ran only this cell group{_peak_note}"


def cell_measure(device: torch.device) -> str:
    rise = "CUDA allocator peak" if device.type == "cuda" else "peak RSS (VmHWM)"
    return (
        f"weights of the cell's target and draft as built + the largest rise of the {rise} "
        "during one of its generations (other resident variants excluded)"
    )

"""Peak memory of one cell: its own models' weights plus what its generations add on top.

In a local run every built variant stays resident, so the process peak is the same for every
cell. A cell's own figure is the bytes of its target and draft weights as built plus the
largest rise of memory during any one of its generations (KV caches, activations,
temporaries): CUDA allocator figures on GPU, the resident set (VmRSS / VmHWM) on CPU.
Where a process serves one cell group only (a Ray worker), its whole peak is the group's
own too (process_peak).

On CPU the high-water mark is restarted by writing "5" to /proc/self/clear_refs. Where that
write is refused (some containers), VmHWM stays the process's peak since it started, and the
figures say so instead of claiming a per-generation peak.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _clear_refs() -> bool:
    """Linux: "5" resets the VmHWM high-water mark of this process; False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryMeter:
    """One process's memory high-water marks, owned by the run's context.

    `reset` restarts the mark before a generation and `peak` reads it after. The highest mark
    seen before any reset is kept (`high_water`), so the process's own peak survives them.
    """

    device: torch.device
    high_water: int = 0
    note: str = ""
    reset_ok: bool | None = None  # did the last reset restart the mark (None: never reset)

    def reset(self) -> int:
        """Restart the high-water mark; returns the bytes resident now (the rise starts here)."""
        self.high_water = max(self.high_water, self.peak()[0])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset_ok = True
            return torch.cuda.memory_allocated(self.device)
        self.reset_ok = _clear_refs()
        return _status_kib("VmRSS") or 0

    def peak(self) -> tuple[int, str]:
        """(bytes, what was measured): the high-water mark since the last reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "torch.cuda.max_memory_allocated"
        hwm = _status_kib("VmHWM")
        if hwm is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, PROCESS_PEAK
        if self.reset_ok:
            return hwm, "peak RSS of the process (VmHWM, reset per generation)"
        return hwm, PROCESS_PEAK

    def rise(self, resident: int) -> tuple[int, bool]:
        """(bytes above `resident` at the peak since the last reset, whether that peak was this
        generation's own). Without a reset the peak is the process's, and so is the rise."""
        return max(self.peak()[0] - resident, 0), bool(self.reset_ok)

    def restart_process(self, note: str) -> None:
        """Start the process's peak afresh (after a worker has built its group's models: the
        transients of loading and quantizing are not the group's serving footprint)."""
        if self.device.type == "cpu":
            _release_free_heap()
        self.reset()
        self.high_water, self.note = 0, note

    def process_peak(self) -> tuple[int, str]:
        """(bytes, what was measured): this process's peak since restart_process, with every
        per-generation reset in between included."""
        peak = max(self.peak()[0], self.high_water)
        what = "CUDA allocator peak" if self.device.type == "cuda" else "peak RSS"
        return peak, f"{what} of the worker process that ran only this cell group{self.note}"


PROCESS_PEAK = (
    "peak RSS since the process started (the high-water mark could not be reset per "
    "generation here: /proc/self/clear_refs refused)"
)


def _release_free_heap() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): quantizing a model on load
    frees hundreds of MiB that would stay in the resident set (nf4 of SmolLM2-135M: 1215 MiB
    resident after the build, 903 MiB after this)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure keeps what the allocator holds
        pass


def cell_measure(device: torch.device, reset_ok: bool = True) -> str:
    """How a cell's peak_memory_bytes was taken."""
    if device.type == "cuda":
        rise = "CUDA allocator peak"
    elif reset_ok:
        rise = "peak RSS (VmHWM, reset before each generation)"
    else:
        return (
            "weights of the cell's target and draft as built + (peak RSS of the whole process "
            "since it started - RSS before the generation): /proc/self/clear_refs refused the "
            "reset, so this bounds the cell's rise from above"
        )
    return (
        f"weights of the cell's target and draft as built + the largest rise of the {rise} "
        "during one of its generations (other resident variants excluded)"
    )

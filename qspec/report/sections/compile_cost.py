"""torch.compile per cell and the warm-up seconds it cost: latency never counts them, so the
report must say where that time went."""

from __future__ import annotations

from qspec.records import GenerationRecord
from qspec.report.analysis import Run
from qspec.report.format import text


def setting(config: dict) -> str | None:
    """The configured torch.compile choice in words; None when the config predates the key."""
    if "compile" not in config:
        return None
    v = config["compile"]
    if v is None:
        return "auto (on for CUDA, off for CPU)"
    return "on" if v is True else "off" if v is False else text(v)


def build(run: Run, cells: list[GenerationRecord]) -> dict:
    on = [c for c in cells if c.compile is True]
    off = [c for c in cells if c.compile is False]
    secs = [c.compile_s for c in on if c.compile_s is not None]
    unknown = len(cells) - len(on) - len(off)
    parts = []
    for n, what in ((len(on), "on"), (len(off), "off"), (unknown, "not recorded")):
        if n:
            every = "all " if n == len(cells) and n > 1 else ""
            parts.append(f"{what} for {every}{n} cell" + "s" * (n != 1))
    return {
        "recorded": bool(on or off),
        "any_on": bool(on),
        "state": ", ".join(parts),
        "setting": setting(run.config),
        "total_s": sum(secs) if secs else None,
        "max_s": max(secs) if secs else None,
        "timed": len(secs),
    }

"""How numbers look on the page: every helper takes anything and shows "—" for what is not a
finite number, so a missing or null field never breaks a table."""

from __future__ import annotations

import math


def num(x) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, bool, text)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def text(x) -> str:
    return "" if x is None else str(x)


def fmt(x, digits: int = 2) -> str:
    v = num(x)
    return "—" if v is None else f"{v:,.{digits}f}"


def fmt_pct(x, digits: int = 1) -> str:
    v = num(x)
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def fmt_signed(x, digits: int = 1, unit: str = "") -> str:
    v = num(x)
    return "—" if v is None else f"{v:+.{digits}f}{unit}"


def fmt_speedup(x) -> str:
    v = num(x)
    return "—" if v is None else f"{v:.2f}×"


def fmt_bytes(x) -> str:
    v = num(x)
    if v is None:
        return "—"
    if v >= 10 * 1024**3:
        return f"{v / 1024**3:,.1f} GiB"
    return f"{v / 1024**2:,.1f} MiB"


def fmt_seconds(x) -> str:
    v = num(x)
    if v is None:
        return "—"
    if v < 1:
        return f"{1000 * v:.0f} ms" if v >= 0.01 else f"{1000 * v:.2f} ms"
    return f"{v:,.2f} s"


def fmt_int(x) -> str:
    v = num(x)
    return "—" if v is None else f"{int(round(v)):,}"


FILTERS = {
    "f": fmt,
    "pct": fmt_pct,
    "signed": fmt_signed,
    "x": fmt_speedup,
    "bytes": fmt_bytes,
    "secs": fmt_seconds,
    "int": fmt_int,
}


def interval(ci) -> tuple[float, float] | None:
    """A stored [low, high] interval as two finite floats, or None (missing, malformed, null)."""
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return None
    lo, hi = num(ci[0]), num(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def fmt_ci(ci, digits: int = 2, style: str = "f") -> str:
    """ "95% CI a–b", or "95% CI —" where the run recorded none (older runs)."""
    iv = interval(ci)
    if iv is None:
        return "95% CI —"
    show = {"f": lambda v: f"{v:,.{digits}f}", "pct": lambda v: f"{100 * v:.{digits}f}%"}.get(
        style, lambda v: f"{v:.2f}×"
    )
    return f"95% CI {show(iv[0])}–{show(iv[1])}"


FILTERS["ci"] = fmt_ci
FILTERS["cipct"] = lambda ci, digits=1: fmt_ci(ci, digits, "pct")
FILTERS["cix"] = lambda ci: fmt_ci(ci, 2, "x")

"""The on-disk cache of converted and quantized models: sizes, a limit, least-recently-used eviction.

Each entry is a folder under $QSPEC_CACHE/<kind>/<name>. Using an entry touches its
`.qspec-last-used` stamp; when the cache grows past its limit (QSPEC_CACHE_MAX_GB, default
20), the entries used longest ago are deleted first, never the one just written.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qspec.models import cache_root

KINDS = ("models", "gptq", "suites")
STAMP = ".qspec-last-used"
DEFAULT_LIMIT_GB = 20.0


@dataclass
class Entry:
    kind: str
    name: str
    path: Path
    bytes: int
    last_used: float


def limit_bytes() -> int:
    raw = os.environ.get("QSPEC_CACHE_MAX_GB", str(DEFAULT_LIMIT_GB))
    try:
        return int(float(raw) * 1024**3)
    except ValueError:
        raise ValueError(f"QSPEC_CACHE_MAX_GB={raw!r}: expected a number of gigabytes") from None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def touch(path: Path) -> None:
    """Mark an entry as used now."""
    stamp = Path(path) / STAMP
    stamp.touch()
    os.utime(stamp)


def entries(root: Path | None = None) -> list[Entry]:
    root = root or cache_root()
    out = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in sorted(
            p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            stamp = path / STAMP
            used = stamp.stat().st_mtime if stamp.exists() else path.stat().st_mtime
            out.append(Entry(kind, path.name, path, _size(path), used))
    return out


def enforce_limit(keep: Path | None = None, limit: int | None = None) -> list[Entry]:
    """Delete least recently used entries until the cache fits the limit; returns what was deleted."""
    limit = limit_bytes() if limit is None else limit
    all_entries = sorted(entries(), key=lambda e: e.last_used)
    total = sum(e.bytes for e in all_entries)
    removed = []
    for e in all_entries:
        if total <= limit:
            break
        if keep is not None and e.path.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        total -= e.bytes
        removed.append(e)
    return removed


def clear(names: list[str] | None = None) -> list[Entry]:
    """Delete the named entries ('kind/name' or 'name'), or every entry."""
    gone = []
    for e in entries():
        if not names or e.name in names or f"{e.kind}/{e.name}" in names:
            shutil.rmtree(e.path, ignore_errors=True)
            gone.append(e)
    return gone


def describe_entries() -> str:
    rows = entries()
    if not rows:
        return f"cache {cache_root()} is empty"
    lines = [f"cache {cache_root()} (limit {limit_bytes() / 1024**3:.1f} GiB)"]
    for e in sorted(rows, key=lambda e: -e.last_used):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        lines.append(
            f"  {e.kind + '/' + e.name:48s} {e.bytes / 1024**2:10.1f} MiB  last used {used}"
        )
    lines.append(f"  total {sum(e.bytes for e in rows) / 1024**2:.1f} MiB")
    return "\n".join(lines)

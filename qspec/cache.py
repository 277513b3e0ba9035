"""The on-disk cache: where it lives, what it holds, atomic writes, least-recently-used eviction.

Everything qspec keeps between runs lives under cache_root() ($QSPEC_CACHE, default
~/.cache/qspec), one folder per kind (KINDS), one entry per folder or file inside it.
Entries are written with atomic_dir, so an entry that exists is complete. Using an
entry touches its `.qspec-last-used` stamp; when the cache grows past its limit
(QSPEC_CACHE_MAX_GB, default 20), the entries used longest ago are deleted first,
never the one just written. This module imports nothing else from qspec.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KINDS = {
    "models": "converted models (the default model dequantized to safetensors)",
    "gptq": "GPTQ int4 models, keyed by model and calibration text",
    "suites": "files generated for built-in suites (lm-eval task YAML and data)",
    "random-models": "random-weight models of realistic size built by benchmarks/engine.py",
    "skip-search": "layer-skip search results, one JSON file each",
    "heads": "EAGLE-3 draft heads trained by qspec, one per target variant, text and settings",
    "compressed": "compressed-tensors checkpoints built by llm-compressor (W8A8, FP8, W4A16)",
}
STAMP = ".qspec-last-used"
SOURCE = "qspec-source.json"  # written last into a model entry: the entry is finished
DEFAULT_LIMIT_GB = 20.0
TEMP_MARK = ".tmp-"  # unfinished atomic_dir folders are named .<name>.tmp-<pid>@<host>@<random>


def cache_root() -> Path:
    """Where every cache entry lives: $QSPEC_CACHE or ~/.cache/qspec (the one reader of it)."""
    raw = os.environ.get("QSPEC_CACHE") or Path.home() / ".cache" / "qspec"
    return Path(raw).expanduser()


def entry_dir(kind: str, name: str) -> Path:
    """The path of one entry; kinds are fixed here so that list, clear and the limit see them all."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r} (known: {', '.join(KINDS)})")
    return cache_root() / kind / name


@contextmanager
def building(final: Path) -> Iterator[bool]:
    """Hold an entry's build lock; yields whether the entry is still missing. A second process
    building the same entry (another run, a parallel test worker) waits here and then finds it
    finished, instead of building it again and replacing the first one's under its readers."""
    final = Path(final)
    locks = cache_root() / ".locks"  # beside the kinds, so no kind's folder holds a stray file
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{final.parent.name}-{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield not (final / SOURCE).exists()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; move it to `final` only if the block succeeds.

    A reader never sees a half-written entry and an interrupted build leaves nothing that
    looks finished: on an exception the temporary folder is removed and `final` is left
    as it was. An existing `final` is replaced (moved aside, then deleted). If another
    process puts the same entry in place in the same instant, its copy stays.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(final.name)))
    old = final.with_name(f"{tmp.name}-old")
    try:
        yield tmp
        try:
            final.rename(old)
        except FileNotFoundError:
            pass
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Mark an entry folder as used now."""
    stamp = Path(path) / STAMP
    stamp.touch()
    os.utime(stamp)


def entries(root: Path | None = None) -> list[Entry]:
    """Every finished entry of every kind (hidden names, such as unfinished builds, are not)."""
    root = root or cache_root()
    out = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.suffix == ".tmp":
                continue
            stamp = path / STAMP
            used = stamp.stat().st_mtime if stamp.exists() else path.stat().st_mtime
            out.append(Entry(kind, path.name, path, _size(path), used))
    return out


def temp_prefix(name: str, pid: int | None = None) -> str:
    """Names the builder, so leftovers() can tell a killed build from one still running."""
    return f".{name}{TEMP_MARK}{os.getpid() if pid is None else pid}@{socket.gethostname()}@"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(root: Path | None = None) -> list[Path]:
    """Unfinished atomic_dir folders of this host whose process is gone (killed mid-build).

    Builds on other hosts sharing the cache are left alone: their process ids mean nothing here.
    """
    root = root or cache_root()
    out = []
    for kind in KINDS:
        for path in sorted((root / kind).glob(f".*{TEMP_MARK}*@*@*")):
            pid, host, _ = path.name.rsplit(TEMP_MARK, 1)[1].split("@", 2)
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                out.append(path)
    return out


def enforce_limit(keep: Path | None = None, limit: int | None = None) -> list[Entry]:
    """Delete least recently used entries until the cache fits the limit; returns what was deleted."""
    limit = limit_bytes() if limit is None else limit
    for path in leftovers():
        _remove(path)
    all_entries = sorted(entries(), key=lambda e: e.last_used)
    total = sum(e.bytes for e in all_entries)
    removed = []
    for e in all_entries:
        if total <= limit:
            break
        if keep is not None and e.path.resolve() == Path(keep).resolve():
            continue
        _remove(e.path)
        total -= e.bytes
        removed.append(e)
    return removed


def clear(names: list[str] | None = None) -> list[Entry]:
    """Delete the named entries ('kind/name' or 'name'), or every entry and unfinished build."""
    if not names:
        for path in leftovers():
            _remove(path)
    gone = []
    for e in entries():
        if not names or e.name in names or f"{e.kind}/{e.name}" in names:
            _remove(e.path)
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

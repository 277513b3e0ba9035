"""Results store: one JSON line per cell, appended atomically, keyed for resume."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cell_key(fields: dict) -> str:
    """A stable hash of everything that determines a cell's result."""
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def append(path: Path, record: dict) -> None:
    """Write the whole line with one O_APPEND write and fsync: a kill leaves it whole or absent."""
    line = (json.dumps(record, default=_plain) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> list[dict]:
    """All complete records; a torn last line (from a crash mid-write) is ignored."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_json(path: Path, obj: dict) -> None:
    """Replace a JSON file atomically (write a temp file beside it, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_plain)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plain(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a results file")

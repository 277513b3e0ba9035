"""A run directory as typed records: run.json -> RunInfo, results.jsonl -> records.

Nothing here fails on a damaged run: a missing or unreadable file, or a record that cannot be
understood, becomes a note the report shows, and the rest of the run is read as usual.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ValidationError

from qspec import records, store
from qspec.records import CLASSES, Record, RunInfo


def load_run(run_dir: Path) -> tuple[RunInfo, list[Record], list[str]]:
    """run.json, the records (the last one per key: a resumed run rewrites cells), and notes."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    info = _run_info(run_dir / "run.json", notes)
    path = run_dir / "results.jsonl"
    if not path.exists():
        notes.append("results.jsonl is missing")
    out, dropped, trimmed = [], Counter(), set()
    for raw in _latest(store.read(path)):
        kind = raw.get("kind")
        if not isinstance(kind, str) or kind not in CLASSES:
            continue  # a kind from another version of qspec: nothing here knows how to show it
        rec, bad = _parse(raw)
        if rec is None:
            dropped[kind] += 1
        else:
            out.append(rec)
            trimmed.update(bad)
    if dropped:
        kinds = ", ".join(f"{k} ({n})" for k, n in sorted(dropped.items()))
        n = sum(dropped.values())
        notes.append(
            f"{n} record{'s' if n != 1 else ''} in results.jsonl could not be understood and "
            f"{'are' if n != 1 else 'is'} left out: {kinds}"
        )
    if trimmed:
        notes.append(
            f"results.jsonl: fields that could not be understood are left out: {_names(trimmed)}"
        )
    return info, out, notes


def _names(fields: set[str]) -> str:
    return ", ".join(sorted(fields))


def _latest(raws: list) -> list[dict]:
    """One record per key, the last written, in the order of their last writes; keyless last."""
    by_key: dict[str, dict] = {}
    loose = []
    for r in raws:
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("key"), str):
            by_key.pop(r["key"], None)
            by_key[r["key"]] = r
        else:
            loose.append(r)
    return list(by_key.values()) + loose


def _parse(raw: dict) -> tuple[Record | None, list[str]]:
    """The typed record, and the fields left out to read it: an older writer's malformed optional
    field costs that field, not the whole cell. None where a required field is missing."""
    rec = records.parse(raw)
    if rec is not None:
        return rec, []
    up = records.upgrade(raw)
    bad = _invalid_fields(CLASSES[up["kind"]], up)
    if not bad:
        return None, []
    rec = records.parse({k: v for k, v in up.items() if k not in bad})
    return rec, sorted(bad) if rec is not None else []


def _invalid_fields(model: type[BaseModel], data: dict) -> set[str]:
    """Top-level fields that fail validation (a nested part counts as its field); empty when a
    required field is missing, which no leaving out can mend."""
    try:
        model.model_validate(data)
    except ValidationError as err:
        errors = [e for e in err.errors() if e["loc"]]
        if any(e["type"] == "missing" and len(e["loc"]) == 1 for e in errors):
            return set()
        return {str(e["loc"][0]) for e in errors}
    return set()


def _run_info(path: Path, notes: list[str]) -> RunInfo:
    if not path.exists():
        notes.append("run.json is missing")
        return RunInfo()
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"run.json could not be read: {err}")
        return RunInfo()
    if not isinstance(loaded, dict):
        notes.append("run.json does not hold a JSON object")
        return RunInfo()
    bad = _invalid_fields(RunInfo, loaded)
    if bad:
        notes.append(f"run.json: fields that could not be understood are left out: {_names(bad)}")
    return RunInfo.model_validate({k: v for k, v in loaded.items() if k not in bad})

"""The report reads typed records: older layouts load, damaged records become notes, no torch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from qspec.records import GenerationRecord, QualityRecord
from qspec.report import load_run, write_report

DATA = Path(__file__).parent / "data" / "results-small"


def _records() -> list[dict]:
    return [json.loads(x) for x in (DATA / "results.jsonl").read_text().splitlines() if x]


def _save(run_dir: Path, recs: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "run.json", run_dir / "run.json")
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def _section(html: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S).group(1)


def test_rendering_never_imports_torch(tmp_path):
    """An interrupted run too: listing its missing cells plans them without the runner."""
    run_dir = tmp_path / "run"
    shutil.copytree(DATA, run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["status"] = "interrupted"
    (run_dir / "run.json").write_text(json.dumps(meta))
    code = (
        "import sys\n"
        "import qspec.report\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        f"qspec.report.write_report({str(run_dir)!r})\n"
        f"qspec.report.summary_text({str(run_dir)!r})\n"
        "assert 'torch' not in sys.modules, 'render'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Planned but not recorded" in (run_dir / "index.html").read_text()  # it did plan


def test_fixture_loads_as_typed_records():
    info, recs, notes = load_run(DATA)
    assert info.hardware_label == "CPU: AMD EPYC (2 threads)" and info.status == "complete"
    assert notes == []  # the future kind is skipped without a note: it is not an error
    assert not any(getattr(r, "kind", None) == "some_future_kind" for r in recs)
    assert sum(isinstance(r, GenerationRecord) for r in recs) == 32
    q = next(r for r in recs if isinstance(r, QualityRecord) and r.variant == "int8")
    assert (q.positions, q.kl_mean_se, q.dp_rms) == (1024, 0.0009, 0.011)


def test_quality_in_the_older_layout_renders(tmp_path):
    """Quality records that only carry tokens, kl_se and rms_dp show the same figures."""
    recs = _records()
    for r in recs:
        if r.get("kind") == "quality":
            r.pop("positions", None)
            r["kl_se"] = r.pop("kl_mean_se", None)
    html = write_report(_save(tmp_path / "old", recs)).read_text()
    q = _section(html, "quality")
    assert "0.0123 ± 0.0009" in q  # int8 KL mean ± se, read from kl_se
    assert "1,024" in q and "Scored on 1024 tokens per variant" in q
    assert "section-error" not in html


def test_last_record_per_key_wins(tmp_path):
    recs = _records()
    cell = next(r for r in recs if r.get("kind") == "speculative" and r.get("status") == "ok")
    recs.append({**cell, "status": "failed", "error": "rerun failed: simulated"})
    _, loaded, _ = load_run(_save(tmp_path / "run", recs))
    same = [r for r in loaded if r.key == cell["key"]]
    assert len(same) == 1 and same[0].status == "failed"


def test_damaged_records_become_notes(tmp_path):
    """A record without its required fields is left out; a malformed optional field costs only
    that field; both are said in the failures section, and the rest of the run still shows."""
    recs = _records()
    cell = next(r for r in recs if r.get("kind") == "speculative" and r.get("status") == "ok")
    cell["tokens_per_s"] = "fast"
    cell["roofline"] = {"kind": "verify"}  # a nested part without its figures
    recs.append({"kind": "quality", "key": "no-suite", "variant": "fp32"})
    recs.append({"kind": ["not", "a", "kind"]})
    run_dir = _save(tmp_path / "run", recs)
    _, loaded, notes = load_run(run_dir)
    kept = next(r for r in loaded if r.key == cell["key"])
    assert kept.tokens_per_s is None and kept.roofline is None and kept.speedup == cell["speedup"]
    assert notes == [
        "1 record in results.jsonl could not be understood and is left out: quality (1)",
        "results.jsonl: fields that could not be understood are left out: roofline, tokens_per_s",
    ]
    html = write_report(run_dir).read_text()
    assert "section-error" not in html
    f = _section(html, "failures")
    assert "could not be understood and is left out: quality (1)" in f
    assert "Recommended: target fp32 + draft ngram" in _section(html, "verdict")


def test_unreadable_run_json_fields_are_left_out(tmp_path):
    run_dir = _save(tmp_path / "run", _records())
    meta = json.loads((run_dir / "run.json").read_text())
    meta["seed"] = "not a number"
    meta["writer_note"] = "from a newer qspec"
    (run_dir / "run.json").write_text(json.dumps(meta))
    info, _, notes = load_run(run_dir)
    assert info.status == "complete" and info.seed is None
    assert notes == ["run.json: fields that could not be understood are left out: seed"]
    m = _section(write_report(run_dir).read_text(), "metadata")
    assert "writer_note" in m and "from a newer qspec" in m  # shown under other fields

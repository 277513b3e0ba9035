"""Faults lose nothing, interruptions resume, runs repeat exactly, the cache stays bounded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import greedy_fp32_run, write_config

from qspec import store
from qspec.cli import main
from qspec.report import write_report
from qspec.runner import run_evaluation


def test_out_of_memory_in_one_cell_is_recorded_and_the_run_goes_on(tmp_path, tiny_model_dir):
    def fault(cell):
        if cell.kind == "speculative" and cell.draft == "nf4":
            raise MemoryError("simulated: could not allocate the KV cache")

    cfg, suites = greedy_fp32_run(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    assert run_evaluation(cfg, out, suites, quiet=True, fault=fault) == 1
    write_report(out)
    cells = {
        (r["kind"], r.get("draft")): r for r in store.read(out / "results.jsonl") if "mode" in r
    }
    oom = cells[("speculative", "nf4")]
    assert (
        oom["status"] == "failed"
        and "out of memory" in oom["error"]
        and "simulated" in oom["error"]
    )
    assert cells[("speculative", "ngram")]["status"] == "ok"
    assert cells[("target_only", None)]["status"] == "ok"
    assert (out / "index.html").exists()  # the report renders from partial results
    assert "out of memory" in (out / "index.html").read_text()


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted_and_resume_completes_it(tmp_path, tiny_model_dir):
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        modes='["greedy", "sample"]',
        baselines='["target_only"]',
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qspec.cli",
            "evaluate",
            "--config",
            cfg,
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.jsonl").exists() and len(store.read(out / "results.jsonl")) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert b"--resume" in err
    for line in (out / "results.jsonl").read_text().splitlines():
        json.loads(line)
    before = len(store.read(out / "results.jsonl"))
    assert main(["evaluate", "--config", cfg, "--quiet", "--resume", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert len(store.read(out / "results.jsonl")) > before


def test_same_config_and_seed_repeat_exactly(tmp_path, tiny_model_dir):
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        baselines='["target_only"]',
        _target='precisions = ["fp32"]',
        _draft='precisions = ["fp32", "ngram"]',
    )

    def outcome(out):
        assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
        recs = [r for r in store.read(out / "results.jsonl") if r.get("kind") == "speculative"]
        return {
            (r["draft"], r["mode"]): (
                [o["tokens"] for o in r["outputs"]],
                r["accepted"],
                r["drafted"],
                r["accepted_histogram"],
            )
            for r in recs
        }

    first, second = outcome(tmp_path / "a"), outcome(tmp_path / "b")
    assert first == second
    assert ("fp32", "sample") in first  # sampled outputs are covered too
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    for needed in ("config", "versions", "hardware", "seed"):
        assert run.get(needed) is not None, needed

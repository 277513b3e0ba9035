"""executor = "ray": the same answers as a local run, a dead worker costs only its group,
and the local cluster the run starts is gone when it ends."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
from conftest import write_config

from qspec import store
from qspec.config import load_config
from qspec.runner import run_evaluation
from qspec.suites.discovery import load_suite

pytest.importorskip("ray")

RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard")


def ray_processes() -> list[str]:
    """Ray's own processes on this machine (a cluster left running would show here)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if any(name in line for name in RAY_PROCESSES) and "pytest" not in line:
            found.append(line[:120])
    return found


def left_behind(wait_s: float = 20.0) -> list[str]:
    """Ray processes still alive after the run; workers get a few seconds to exit."""
    deadline = time.monotonic() + wait_s
    while (found := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _run(tmp_path, model_dir, name, executor, fault=None, resume=False, **overrides):
    cfg_path = write_config(
        tmp_path / f"{name}.toml",
        model_dir,
        executor=f'"{executor}"',
        baselines='["target_only"]',
        _draft='precisions = ["int8", "ngram"]\n[ray]\nnum_cpus = 2',
        **overrides,
    )
    cfg = load_config(cfg_path)
    out = tmp_path / name
    status = run_evaluation(
        cfg, out, [load_suite(s) for s in cfg.suites], quiet=True, fault=fault, resume=resume
    )
    return status, out, store.read(out / "results.jsonl")


def _ok(records):
    return {r["key"]: r for r in records if r["status"] == "ok"}


def _engine_figures(r):
    return (
        [o["tokens"] for o in r["outputs"]],
        r["accepted"],
        r["drafted"],
        r["steps"],
        r["accepted_histogram"],
    )


def killer(driver: int):
    """A fault that kills the worker process (never the driver) as it starts the nf4 target's
    sampled cells: a crash, not an exception the job could catch. A closure, so that Ray
    ships it to the worker by value."""

    def fault(cell):
        if cell.target == "nf4" and cell.mode == "sample" and os.getpid() != driver:
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


def test_ray_gives_local_answers_and_a_dead_worker_costs_only_its_group(tmp_path, tiny_model_dir):
    """One Ray run with a worker killed mid-group, beside a local run of the same config: the
    groups that lived give the local run's answers, the dead one fails only its remaining
    cells, the cluster is gone, and a local --resume measures those cells and nothing else."""
    assert not ray_processes(), "a Ray cluster was already running"
    status, local_out, local = _run(tmp_path, tiny_model_dir, "local", "local")
    assert status == 0
    status, ray_out, ray_recs = _run(tmp_path, tiny_model_dir, "ray", "ray", killer(os.getpid()))
    assert status == 1
    assert not left_behind(), "the run's local cluster outlived it"

    engine = [r for r in ray_recs if r["kind"] in ("target_only", "speculative")]
    assert len(engine) == 2 * 2 * 3  # 2 targets x 2 modes x (baseline + 2 drafts)
    lost = [r for r in engine if r["status"] == "failed"]
    # the nf4 group's sampled cells died with the worker; everything else was measured
    assert {(r["target"], r["mode"]) for r in lost} == {("nf4", "sample")}
    assert len(lost) == 3 and all("worker died" in r["error"] for r in lost)
    assert all(r["status"] == "ok" for r in ray_recs if r["kind"] in ("quality", "variant"))

    a, b = _ok(local), _ok(ray_recs)
    assert len(a) == len(local) and set(b) == set(a) - {r["key"] for r in lost}
    for k, r in b.items():
        if r["kind"] in ("target_only", "speculative"):
            assert _engine_figures(r) == _engine_figures(a[k]), r["target"]
            # timings from concurrent workers say so; each group's peak is its own process's
            assert "Ray worker process" in r["hardware"] and "at once" in r["hardware"]
            assert r["group_peak_memory_bytes"] > r["target_weights_bytes"]
    for r in a.values():
        if r["kind"] in ("target_only", "speculative"):
            assert "Ray" not in r["hardware"] and r["group_peak_memory_bytes"] is None
    info = json.loads((ray_out / "run.json").read_text())
    assert info["status"] == "partial"
    assert info["executor"]["kind"] == "ray" and info["executor"]["cluster"]["CPU"] == 2
    assert "Ray worker process" in info["hardware_label"]
    assert json.loads((local_out / "run.json").read_text())["executor"]["kind"] == "local"

    # --resume with the local executor measures the lost cells, and nothing else
    measured = []
    status, _, after = _run(
        tmp_path, tiny_model_dir, "ray", "local", fault=measured.append, resume=True
    )
    assert status == 0
    assert sorted((c.target, c.mode, c.draft or "") for c in measured) == [
        ("nf4", "sample", ""),
        ("nf4", "sample", "int8"),
        ("nf4", "sample", "ngram"),
    ]
    resumed = _ok(after)
    for r in lost:
        assert _engine_figures(resumed[r["key"]]) == _engine_figures(a[r["key"]])

"""Real vLLM servers, started from the venv the noxfile installs, on a tiny model: one sweep
that exercises the levels, the engine's counters, the lossless check, a server SIGKILLed
mid-sweep (its cells fail with its log, the others stand), no server left behind, and a
--resume that measures only the failed cells again. Beside them (in this file, because
`running_servers` sees every process on the machine and pytest-xdist runs files side by
side), the process handling of fake servers that never become healthy or exit at start.

The servers run their model in the engine process (vLLM's uniprocess executor): on a CPU
vLLM otherwise spawns a worker process that imports vLLM once more, 25-35 s of each start on
two cores. What these tests check (qspec's launch, sweep, kill and resume) does not depend
on it; `qspec evaluate` serves with vLLM's defaults."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from qspec import store
from qspec.backends.vllm_probe import Probes
from qspec.backends.vllm_server import (
    Server,
    ServerError,
    ServerSpec,
    running_servers,
    vllm_python,
)

# a CPU server takes the uniprocess executor only with V1 multiprocessing off
UNIPROC = ["--distributed-executor-backend", "uni"]


@pytest.fixture(autouse=True)
def _uniprocess(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def vllm_ready():
    found = Probes().probe(vllm_python(None))
    if found.problem:
        pytest.skip(found.problem)
    return found.version


@pytest.fixture(scope="module")
def servable_model(tmp_path_factory, default_model_dir):
    """A tiny random Llama with the SmolLM2 tokenizer, in a head size vLLM's CPU kernels take."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("servable")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    model = tiny_llama(5, vocab=len(tok), hidden=128, heads=2, max_position_embeddings=2048, **ids)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _api_pid(name: str) -> int | None:
    for pid in running_servers():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--served-model-name" in cmd and name.encode() in cmd:
            return pid
    return None


@pytest.mark.slow
def test_sweep_kill_resume(tmp_path, servable_model, vllm_ready, monkeypatch):
    from qspec.cli import main

    vllm = "concurrency = [1, 2]\nrepeats = 2\nrequests_per_slot = 2\nstartup_timeout_s = 240"
    cfg = _served_config(tmp_path, servable_model, vllm, max_new_tokens="12")
    out = tmp_path / "run"
    killed = []

    def kill_ngram_at_2(cell):
        if getattr(cell, "concurrency", None) == 2 and cell.draft == "ngram" and not killed:
            pid = _api_pid("fp32+ngram")
            assert pid is not None, "the ngram server is not running"
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            time.sleep(1)

    with monkeypatch.context() as faulty:  # the fault for this run only
        faulty.setattr("qspec.runner.RunContext", _with_fault(kill_ngram_at_2))
        assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 1
    assert killed and running_servers() == [], "a server outlived the run"
    recs = _serving(out)
    assert all(recs[(None, c)]["status"] == "ok" for c in (1, 2))
    for c in (1, 2):  # the killed server fails only its own cells, with its last log lines
        dead = recs[("ngram", c)]
        assert dead["status"] == "failed" and "stopped answering" in dead["error"], dead
        assert dead["log_tail"], "no log lines in the failed record"
    alone = recs[(None, 1)]
    assert alone["output_tokens"] > 0 and alone["tpot_s"]["n"] >= 2
    assert alone["engine_version"].startswith("vllm")

    assert main(["evaluate", "--config", cfg, "--quiet", "--resume", str(out)]) == 0
    assert running_servers() == []
    recs = _serving(out)
    for c in (1, 2):
        r = recs[("ngram", c)]
        assert r["status"] == "ok", r["error"]
        assert r["draft_tokens"] > 0 and 0 <= r["acceptance_rate"] <= 1
        assert (
            r["mean_acceptance_length"] >= 1
            and len(r["position_acceptance_unconditional"]) == r["gamma"] == 2
        )
        assert r["lossless"] is True, r["lossless_mismatches"]  # fp32 greedy, n-gram drafts
        assert r["per_request_acceptance_rate"]["n"] >= 1  # vLLM's own per-request counts
        # paired by repeat: n = repeats, not requests (a level's requests share its batches)
        assert (
            r["speedup_pairs"] == 2 and r["speedup_ci95"][0] <= r["speedup"] <= r["speedup_ci95"][1]
        )
        assert r["n_requests"] == max(2, 2 * c)  # two per slot, at least every prompt once
    logs = sorted(p.name for p in (out / "vllm").iterdir())
    assert logs == ["fp32+alone.log", "fp32+ngram.log"]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def _served_config(tmp_path, model, vllm: str, **overrides) -> str:
    """A tiny-model run of the served engine alone: fp32 target, n-gram drafts, greedy."""
    from conftest import write_config

    return write_config(
        tmp_path / "c.toml",
        model,
        engines='["vllm"]',
        modes='["greedy"]',
        _target='precisions = ["fp32"]',
        _draft='precisions = ["ngram"]\nngram_min = 1\nngram_max = 3',
        _vllm=f'targets = ["fp32"]\ndrafts = ["ngram"]\nextra_args = {UNIPROC}\n' + vllm,
        **overrides,
    )


def _serving(out: Path) -> dict:
    """(draft, concurrency) -> the last serving record of that cell (a resume rewrites it)."""
    rows = [r for r in store.read(out / "results.jsonl") if r["kind"] == "serving"]
    return {(r["draft"], r["concurrency"]): r for r in rows}


def _with_fault(fault):
    """RunContext with the fault hook set, as the runner builds it."""
    from qspec.stages.context import RunContext

    def make(**kwargs):
        kwargs["fault"] = fault
        return RunContext(**kwargs)

    return make


@pytest.mark.slow
def test_ctrl_c_while_a_server_starts_leaves_none(tmp_path, servable_model, vllm_ready):
    import subprocess
    import sys

    cfg = _served_config(tmp_path, servable_model, "concurrency = [1]\nrepeats = 1")
    cmd = [sys.executable, "-m", "qspec.cli", "evaluate", "--config", cfg, "--quiet"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "run")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not running_servers() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert running_servers(), "no server was started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert running_servers() == [], "a server outlived Ctrl-C"


@pytest.mark.slow
def test_existing_deployment_is_measured_as_served(tmp_path, servable_model, vllm_ready):
    from qspec.cli import main

    spec = ServerSpec(
        "theirs",
        vllm_python(None),
        str(servable_model),
        speculative={
            "method": "ngram",
            "num_speculative_tokens": 2,
            "prompt_lookup_min": 1,
            "prompt_lookup_max": 3,
        },
        extra_args=UNIPROC,
    )
    with Server(spec, tmp_path / "theirs.log") as server:
        server.wait_healthy(240)
        vllm = f'url = "{server.url}"\nconcurrency = [1, 2]\nrepeats = 1'
        cfg = _served_config(tmp_path, servable_model, vllm)
        out = tmp_path / "run"
        assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
        assert server.alive(), "qspec stopped a server it did not start"
    recs = _serving(out)
    assert set(recs) == {(None, 1), (None, 2)}
    for r in recs.values():
        assert r["status"] == "ok" and r["target"] == "deployment", r["error"]
        assert r["server"] == server.url and r["method"] == "as served" and r["gamma"] == 2
        assert r["draft_tokens"] > 0 and r["speedup"] is None  # no target alone to pair with
    assert running_servers() == []


def _fake_python(tmp_path, script: str):
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_server_that_never_answers_times_out_and_leaves_nothing(tmp_path):
    # a "server" that forks a child and sleeps: stop() must reach the child too
    python = _fake_python(tmp_path, "echo starting; sleep 300 & sleep 300")
    server = Server(ServerSpec("x", python, "m"), tmp_path / "x.log")
    with pytest.raises(ServerError, match="not healthy after 2 s") as err:
        server.wait_healthy(2)
    assert "starting" in err.value.log_tail
    server.stop(grace_s=2)
    assert not server.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pgid, 0)


def test_server_that_exits_reports_its_log(tmp_path):
    python = _fake_python(
        tmp_path, 'echo "ValueError: Unknown quantization method: bitsandbytes"; exit 3'
    )
    server = Server(ServerSpec("y", python, "m", quantization="bitsandbytes"), tmp_path / "y.log")
    with pytest.raises(ServerError, match="exited with code 3") as err:
        server.wait_healthy(30)
    assert any("Unknown quantization" in line for line in err.value.log_tail)
    assert err.value.refused and "Unknown quantization method: bitsandbytes" in str(err.value)
    server.stop(grace_s=1)
    assert "--quantization" in ServerSpec("y", python, "m", quantization="bitsandbytes").command(1)
    assert "127.0.0.1" in server.spec.command(server.port)

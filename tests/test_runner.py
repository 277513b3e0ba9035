"""End to end on a tiny local model: every cell recorded, failures isolated, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import greedy_fp32_run, write_config

from qspec import store
from qspec.cli import main
from qspec.runner import run_evaluation


def records(out):
    return store.read(out / "results.jsonl")


def test_evaluate_covers_every_pairing(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.toml", tiny_model_dir)
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    recs = records(out)
    cells = {(r["kind"], r["target"], r["draft"], r["mode"]) for r in recs if "mode" in r}
    for target in ("fp32", "nf4"):
        for mode in ("greedy", "sample"):
            assert ("target_only", target, None, mode) in cells
            for draft in ("nf4", "ngram"):
                assert ("speculative", target, draft, mode) in cells
                assert ("hf_assisted", target, draft, mode) in cells
    gen = [r for r in recs if r["kind"] == "speculative" and r["target"] != r["draft"]]
    assert all(r["status"] == "ok" for r in gen), [r["error"] for r in gen]
    # the nf4 target drafting for itself is planned, recorded and not measured
    itself = [r for r in recs if "mode" in r and r["target"] == r["draft"] == "nf4"]
    assert itself and all(r["status"] == "unavailable" for r in itself)
    assert all("the draft is this target variant itself" in r["error"] for r in itself)
    for r in gen:
        for field in ("alpha_measured", "acceptance_rate", "tau", "accepted_histogram", "speedup"):
            assert field in r
        assert 1.0 <= r["tau"] <= r["gamma"] + 1
    fp32_greedy = [r for r in gen if r["target"] == "fp32" and r["mode"] == "greedy"]
    assert fp32_greedy and all(r["lossless"] is True for r in fp32_greedy)
    # n-gram lookup drafts only where it finds a match: predicted per step, not by Leviathan's
    # fixed-gamma formula (greedy: its steps replayed exactly, so tau is the measured one)
    for r in (r for r in gen if r["draft"] == "ngram"):
        assert r["prediction_method"].startswith("per step")
        if r["mode"] == "greedy":
            assert r["tau_predicted"] == pytest.approx(r["tau"])
    quality = {r["variant"]: r for r in recs if r["kind"] == "quality"}
    assert quality["fp32"]["kl_mean"] == 0 and quality["nf4"]["kl_mean"] > 0
    variants = {r["precision"]: r for r in recs if r["kind"] == "variant"}
    assert variants["nf4"]["weights_bytes"] < variants["fp32"]["weights_bytes"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["versions"]["torch"] and run["seed"] == 0
    # the lean path on CPU: static caches, no compile; a roofline against the measured bandwidth
    assert run["memory_bandwidth"]["copy_gbps"] > 0
    base = [r for r in recs if r["kind"] == "target_only"]
    for r in base + gen:
        assert r["kv_cache"] == "static" and r["compile"] is False and r["compile_s"] is None
    for r in base:
        assert r["roofline"]["kind"] == "decode" and r["roofline"]["fraction"] > 0
        assert r["roofline"]["bandwidth_gbps"] == run["memory_bandwidth"]["copy_gbps"]
    assert any(r["roofline"] and r["roofline"]["kind"] == "verify" for r in gen)
    # transformers' peer is timed against its own plain generate, interleaved with it: its
    # speedup is the paired per-prompt ratio of the two, and qspec's loop is compared with both
    for target in ("fp32", "nf4"):
        for mode in ("greedy", "sample"):
            group = [r for r in recs if (r.get("target"), r.get("mode")) == (target, mode)]
            alone = next(r for r in group if r["kind"] == "hf_target_only")
            qspec_alone = next(r for r in group if r["kind"] == "target_only")
            assert alone["status"] == "ok" and alone["speedup"] is None
            assert alone["qspec_over_hf"] == pytest.approx(
                _paired(qspec_alone["outputs"], alone["outputs"]), rel=1e-6
            )
            for peer in (r for r in group if r["kind"] == "hf_assisted"):
                if peer["draft"] == target:  # the nf4 target drafting for itself: not measured
                    assert peer["status"] == "unavailable"
                    continue
                assert peer["status"] == "ok", peer["error"]
                ratio = _paired(peer["outputs"], alone["outputs"])
                assert peer["speedup"] == pytest.approx(ratio, rel=1e-6)
                assert peer["speedup_pairs"] == len(alone["outputs"])
                if mode == "greedy":
                    same = all(
                        a["tokens"] == b["tokens"]
                        for a, b in zip(peer["outputs"], alone["outputs"], strict=True)
                    )
                    assert peer["lossless"] is same


def _paired(mine: list[dict], theirs: list[dict]) -> float:
    """The geometric mean of per-prompt tokens/s ratios (one repeat: each prompt once)."""
    import math

    logs = [
        math.log(a["tokens_per_s"] / b["tokens_per_s"]) for a, b in zip(mine, theirs, strict=True)
    ]
    return math.exp(sum(logs) / len(logs))


def test_an_unloadable_draft_fails_its_cells_and_the_run_goes_on(tmp_path, tiny_model_dir):
    missing = tmp_path / "no-such-model"
    missing.mkdir()  # exists, so the config accepts it, but holds no weights
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        modes='["greedy"]',
        baselines='["target_only"]',
        _target='precisions = ["fp32"]',
    )
    text = (
        open(cfg)
        .read()
        .replace(
            f'ref = {json.dumps(str(tiny_model_dir))}\nprecisions = ["nf4", "ngram"]',
            f'ref = {json.dumps(str(missing))}\nprecisions = ["nf4", "ngram"]',
        )
    )
    open(cfg, "w").write(text)
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 1
    by_draft = {r["draft"]: r for r in records(out) if r["kind"] == "speculative"}
    assert by_draft["nf4"]["status"] == "failed" and "no-such-model" in by_draft["nf4"]["error"]
    assert by_draft["ngram"]["status"] == "ok"
    assert json.loads((out / "run.json").read_text())["status"] == "partial"


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("gamas = [1]", "gamas = [1]: unknown key"),
        ("gammas = [0]", "gamma 0 out of range"),
        ("gammas = []", "gammas"),
        ('modes = ["beam"]', "modes.0"),
        ("[sampling]\ntemperature = -1", "sampling.temperature"),
        ("[sampling]\ntop_p = 1.5", "sampling.top_p"),
        ('[target]\nprecisions = ["int3"]', "unknown precision 'int3'"),
        ("[target]\nprecisions = []", "target.precisions"),
        ('[draft]\nprecisions = ["medusa"]', "unknown precision or drafter 'medusa'"),
        ('[draft]\nprecisions = ["self:int3"]', "unknown precision 'int3' after 'self:'"),
        ('[target]\nref = "not a model"\nprecisions = ["fp32"]', "neither an existing local path"),
    ],
)
def test_bad_config_is_rejected_before_loading_with_exit_2(tmp_path, capsys, snippet, expected):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(snippet + "\n")
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(cfg) in err
    assert not (tmp_path / "o").exists()


def test_unknown_suite_is_rejected_with_exit_2(tmp_path, capsys):
    assert main(["evaluate", "--suite", "no-such-suite", "--out", str(tmp_path / "o")]) == 2
    assert "no-such-suite" in capsys.readouterr().err


def _run_cli(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "qspec.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kw,
    )


def _keys(out):
    return {r["key"]: r["status"] for r in records(out)}


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_records(tmp_path, tiny_model_dir):
    cfg = write_config(
        tmp_path / "c.toml", tiny_model_dir, modes='["greedy"]', baselines='["target_only"]'
    )
    full = tmp_path / "full"
    assert main(["evaluate", "--config", cfg, "--out", str(full), "--quiet"]) == 0
    killed = tmp_path / "killed"
    for attempt in range(3):  # kill at a different moment each time, resuming what is there
        args = ["evaluate", "--config", cfg, "--quiet"]
        args += ["--resume", str(killed)] if killed.exists() else ["--out", str(killed)]
        proc = _run_cli(args)
        deadline = time.time() + 120
        target_lines = 3 + 2 * attempt
        while time.time() < deadline and proc.poll() is None:
            if (killed / "results.jsonl").exists() and len(records(killed)) >= target_lines:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for line in (killed / "results.jsonl").read_text().splitlines():
            json.loads(line)  # no torn lines
    assert main(["evaluate", "--config", cfg, "--quiet", "--resume", str(killed)]) == 0
    ok_full = {k for k, s in _keys(full).items() if s == "ok"}
    ok_resumed = {k for k, s in _keys(killed).items() if s == "ok"}
    assert ok_full == ok_resumed


def test_a_suite_that_needs_the_hub_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["evaluate", "--suite", "standard", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'standard' needs the Hugging Face hub" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "o").exists()


def test_a_model_torch_compile_cannot_handle_is_measured_eagerly(
    tmp_path, tiny_model_dir, monkeypatch
):
    """compile = true must never lose a cell: the failure is recorded and timing goes on eagerly."""
    import qspec.stages.context
    from qspec.engine.compiled import Compiled

    class Broken(Compiled):
        def __init__(self, model):
            super().__init__(model)

            def step(*args, **kwargs):
                raise RuntimeError("inductor cannot trace this kernel")

            self.step = step

    monkeypatch.setattr(qspec.stages.context, "Compiled", Broken)
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        compile="true",
        modes='["greedy"]',
        baselines='["target_only"]',
        _target='precisions = ["fp32"]',
        _draft='precisions = ["ngram"]',
    )
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    engine = [r for r in records(out) if r["kind"] in ("target_only", "speculative")]
    assert {r["kind"] for r in engine} == {"target_only", "speculative"}
    for r in engine:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0
        assert r["compile"] is False and r["compile_s"] is None
        assert "inductor cannot trace this kernel" in r["compile_error"]


def test_resume_measures_only_what_is_not_finished(tmp_path, tiny_model_dir):
    """A resumed run re-measures no finished cell; a cell stored as failed is measured again."""
    cfg, suites = greedy_fp32_run(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    assert run_evaluation(cfg, out, suites, quiet=True) == 0
    first = records(out)
    measured = []
    assert run_evaluation(cfg, out, suites, quiet=True, resume=True, fault=measured.append) == 0
    assert measured == []
    # the resumed run appended only the variant records (rebuilt, never measured)
    assert {r["kind"] for r in records(out)[len(first) :]} == {"variant"}

    # mark one cell failed, as an interrupted attempt would leave it: it is measured again,
    # with its group's baseline re-timed beside it (a speedup is paired with its baseline)
    lines = (out / "results.jsonl").read_text().splitlines()
    ngram = next(i for i, r in enumerate(map(json.loads, lines)) if r.get("draft") == "ngram")
    broken = {**json.loads(lines[ngram]), "status": "failed", "error": "killed"}
    lines[ngram] = json.dumps(broken)
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert run_evaluation(cfg, out, suites, quiet=True, resume=True, fault=measured.append) == 0
    assert [(c.kind, c.draft) for c in measured] == [
        ("target_only", None),
        ("speculative", "ngram"),
    ]
    again = [r for r in records(out) if r["key"] == broken["key"]]
    assert [r["status"] for r in again] == ["failed", "ok"]
    # the re-measured cell still found its (stored, not re-measured) baseline
    assert again[-1]["speedup"] > 0 and again[-1]["lossless"] is True


def test_confidence_cells_are_predicted_per_step(tmp_path, tiny_model_dir):
    """Confidence stopping drafts fewer than gamma where the draft is unsure: greedy, its steps
    are replayed exactly (the drafter's confidence decides them, as in the engine), so the
    prediction is per step and its tau and alpha are the measured ones."""
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        modes='["greedy"]',
        baselines='["target_only"]',
        draft_lengths='["fixed", "confidence"]',
        _target='precisions = ["fp32"]',
        _draft='precisions = ["nf4"]',
    )
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    spec = {r["draft_length"]: r for r in records(out) if r["kind"] == "speculative"}
    assert spec["fixed"]["alpha_agrees"] in (True, False)
    assert spec["fixed"]["prediction_method"].startswith("iid")
    confident = spec["confidence"]
    assert confident["prediction_method"].startswith("per step")
    assert confident["tau_predicted"] == pytest.approx(confident["tau"])
    if confident["tested"]:
        assert confident["alpha_predicted"] == pytest.approx(confident["alpha_measured"])
        assert confident["alpha_agrees"] is True
    else:  # the draft was never sure enough to draft: nothing tested, predicted or measured
        assert confident["alpha_predicted"] is None and confident["steps_without_drafts"] > 0


def test_out_and_a_different_resume_folder_are_rejected(tmp_path, capsys):
    """A resumed run continues in its own folder: an --out naming another is an error, not
    silently ignored."""
    (tmp_path / "a").mkdir()
    code = main(["evaluate", "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert code == 2
    assert "--resume" in capsys.readouterr().err and not (tmp_path / "b").exists()

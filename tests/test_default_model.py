"""Checks on the real default model (SmolLM2-135M-Instruct from the packaged GGUF)."""

from __future__ import annotations

import pytest
from conftest import write_config

from qspec import store
from qspec.cli import main
from qspec.models.builders import BuildContext, build, weight_bytes

pytestmark = pytest.mark.slow


def test_weights_shrink_with_precision(default_model_dir):
    sizes = {
        p: weight_bytes(build(p, BuildContext(default_model_dir, "cpu")))
        for p in ("fp32", "int8", "nf4")
    }
    assert sizes["nf4"] < sizes["int8"] < sizes["fp32"]
    # 135M parameters: fp32 holds 4 bytes each (embeddings tied, counted once)
    assert 0.5e9 < sizes["fp32"] < 0.56e9


def test_predictions_on_visited_text_agree_with_measured_acceptance(tmp_path, default_model_dir):
    """Every cell is predicted on its own visited text, greedy and sampled, model and n-gram
    drafts: predicted alpha is within max(0.05, 2 standard errors) of the measured one, a
    greedy replay of the drafter reproduces the measured steps exactly, and each cell's peak
    memory is its own (the n-gram cell, measured after the int8 draft's in the same group,
    peaks below it). The fp32 target only: it is the batch-invariant one, where the
    prediction is judged (an nf4 target here cost half the test's time and asserted only
    its replay)."""
    cfg = write_config(
        tmp_path / "c.toml",
        "smollm2-135m-instruct",
        modes='["greedy", "sample"]',
        baselines='["target_only"]',
        gammas="[3]",
        max_new_tokens="48",
        max_prompts="4",
        suites='["default"]',
        _target='precisions = ["fp32"]',
        _draft='precisions = ["int8", "ngram"]',
        _quality="invariance_positions = 32",  # fp32's invariance is judged in test_invariance
    )
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    recs = store.read(out / "results.jsonl")
    spec = {(r["target"], r["draft"], r["mode"]): r for r in recs if r["kind"] == "speculative"}
    invariant = {r["precision"]: r["batch_invariant"] for r in recs if r["kind"] == "variant"}
    assert invariant["fp32"] is True
    for (target, draft, mode), r in spec.items():
        assert r["status"] == "ok", r["error"]
        assert r["tested"] > 0
        # the prefill's token is never drafted, so never predicted
        assert r["alpha_predicted_positions"] <= sum(len(o["tokens"]) - 1 for o in r["outputs"])
        assert r["target_batch_invariant"] is True
        assert r["tested"] >= 20  # sampled text repeats less: n-gram drafts test ~30 there
        assert r["alpha_agrees"], (
            target,
            draft,
            mode,
            r["alpha_measured"],
            r["alpha_predicted"],
        )
        if mode == "greedy":
            assert r["replay_exact"] is True and r["tau_replay"] == r["tau"]
        low, high = r["alpha_measured_ci95"]
        assert low <= r["alpha_measured"] <= high
    assert spec[("fp32", "int8", "greedy")]["lossless"] is True
    assert spec[("fp32", "ngram", "greedy")]["lossless"] is True
    for mode in ("greedy", "sample"):
        ngram, int8 = spec[("fp32", "ngram", mode)], spec[("fp32", "int8", mode)]
        assert ngram["peak_memory_bytes"] < int8["peak_memory_bytes"]

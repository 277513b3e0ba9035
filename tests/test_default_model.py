"""Checks on the real default model (SmolLM2-135M-Instruct from the packaged GGUF)."""

from __future__ import annotations

import pytest
from conftest import write_config

from qspec import store
from qspec.cli import main
from qspec.variants import BuildContext, build, weight_bytes

pytestmark = pytest.mark.slow


def test_weights_shrink_with_precision(default_model_dir):
    sizes = {
        p: weight_bytes(build(p, BuildContext(default_model_dir, "cpu")))
        for p in ("fp32", "int8", "nf4")
    }
    assert sizes["nf4"] < sizes["int8"] < sizes["fp32"]
    # 135M parameters: fp32 holds 4 bytes each (embeddings tied, counted once)
    assert 0.5e9 < sizes["fp32"] < 0.56e9


def test_predicted_and_measured_greedy_acceptance_agree(tmp_path, default_model_dir):
    """Teacher-forced top-1 agreement on the visited text predicts measured greedy alpha."""
    cfg = write_config(
        tmp_path / "c.toml",
        "smollm2-135m-instruct",
        modes='["greedy"]',
        baselines='["target_only"]',
        gammas="[4]",
        max_new_tokens="48",
        max_prompts="4",
        suites='["default"]',
        _target='precisions = ["fp32"]',
        _draft='precisions = ["nf4", "ngram"]',
    )
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    spec = {r["draft"]: r for r in store.read(out / "results.jsonl") if r["kind"] == "speculative"}
    nf4 = spec["nf4"]
    assert nf4["tested"] >= 100
    assert abs(nf4["alpha_predicted"] - nf4["alpha_measured"]) <= 0.05, nf4
    assert 0.4 < nf4["alpha_measured"] < 0.95  # nf4 disagrees with fp32 often enough to matter
    assert nf4["lossless"] is True and spec["ngram"]["lossless"] is True

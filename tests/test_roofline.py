"""The bandwidth roofline: a measured bound, and each step's fraction of it."""

from __future__ import annotations

import pytest
import torch

from qspec.config import RunConfig, resolve_defaults
from qspec.measure.roofline import copy_bandwidth, roofline


def test_copy_bandwidth_is_measured_on_the_device():
    bw = copy_bandwidth(torch.device("cpu"), nbytes=16 << 20, samples=3)
    assert bw["device"] == "cpu" and bw["buffer_bytes"] == 16 << 20 and bw["samples"] == 3
    assert 0.05 < bw["copy_gbps"] < 10_000  # some real number of GB/s, not a placeholder
    assert "read plus bytes written" in bw["method"]


def test_fraction_is_weight_bytes_over_step_time_over_bandwidth():
    bw = {"copy_gbps": 20.0}
    r = roofline("decode", 1_000_000_000, [0.2, 0.1, 0.1, 0.4, 0.1], bw)
    assert r["step_s_p50"] == 0.1 and r["step_samples"] == 5
    assert r["achieved_gbps"] == pytest.approx(10.0)
    assert r["fraction"] == pytest.approx(0.5)
    assert roofline("verify", 1_000, [], bw) is None  # no verify steps: no figure, not zero
    assert roofline("verify", None, [0.1], bw) is None


def test_compile_defaults_to_cuda_only():
    assert resolve_defaults(RunConfig(), "cpu").compile is False
    assert resolve_defaults(RunConfig(), "cuda").compile is True
    assert resolve_defaults(RunConfig(compile=True), "cpu").compile is True

"""Latency as a user sees it: one inter-token gap per step (its tokens arrive together), TPOT
per request, and memory figures that say how they were taken."""

from __future__ import annotations

import pytest
import torch

from qspec.engine.loop import Generation, Step
from qspec.measure import memory
from qspec.measure.latency import Latency


def test_a_step_that_emits_four_tokens_is_one_gap():
    gen = Generation(
        prompt_len=5,
        tokens=list(range(6)),
        steps=[Step(3, 3, 4, 0.10, 0.20), Step(0, 0, 1, 0.0, 0.05)],
        prefill_s=0.5,
        ttft_s=0.5,
        draft_prefill_s=0.05,
        total_s=0.9,
    )
    f = Latency.of([gen]).fields()
    # the first gap carries the draft's prefill, which runs after the first token
    assert f["itl_s"]["n"] == 2
    assert f["itl_s"]["p50"] == pytest.approx((0.35 + 0.05) / 2)
    assert f["itl_s"]["mean"] == pytest.approx(0.2)
    assert f["tpot_s"]["n"] == 1 and f["tpot_s"]["p50"] == pytest.approx((0.9 - 0.5) / 5)
    assert "token_latency_s_p50" not in f


def test_a_refused_reset_labels_the_peak_as_the_process_peak(monkeypatch):
    monkeypatch.setattr(memory, "_clear_refs", lambda: False)
    meter = memory.MemoryMeter(torch.device("cpu"))
    resident = meter.reset()
    rise, own = meter.rise(resident)
    assert own is False and rise >= 0
    assert "since the process started" in meter.peak()[1]
    assert "refused" in memory.cell_measure(torch.device("cpu"), reset_ok=False)


def test_a_reset_that_happens_says_so(monkeypatch):
    monkeypatch.setattr(memory, "_clear_refs", lambda: True)
    meter = memory.MemoryMeter(torch.device("cpu"))
    meter.reset()
    assert meter.reset_ok is True and "reset per generation" in meter.peak()[1]

"""The whole run's time left: no guess before anything finished, stored items excluded on
resume, and, replayed on a recorded default run's timeline, never off by more than a factor
of two after the first fifth of the run (also on a machine three times slower, with the
builds (variants, the head) as fast: they come from the cache)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qspec.eta import PRIOR, Eta, replay

DATA = Path(__file__).parent / "data"
# the default before it was resized (Intel Xeon, 55 items), after (AMD EPYC, fresh caches),
# and with heads and W8A8 on a fresh clone standing in for AVX2 (its items carry their batch)
TIMELINES = [
    DATA / "timeline-default.json",
    DATA / "timeline-default-amd.json",
    DATA / "timeline-default-avx2.json",
]
BUILDS = ("variant", "variant gptq-int4", "head")


def _planned(kinds, batches=None):
    batches = batches or [None] * len(kinds)
    return [
        SimpleNamespace(keys={f"k{i}"}, record=SimpleNamespace(kind=k, precision=None), batch=b)
        for i, (k, b) in enumerate(zip(kinds, batches, strict=True))
    ]


def test_no_estimate_before_anything_finished_and_resume_skips_stored_items():
    now = [0.0]
    kinds = ["variant", "speculative", "speculative", "task"]
    eta = Eta(_planned(kinds), lambda k: k == "k0", clock=lambda: now[0])
    assert eta.left() is None
    now[0] = 10.0
    eta.seen(SimpleNamespace(key="k1", stage_key=None))
    # one more cell at the measured 10 s, a task costed by its prior scaled like the cell
    left = eta.left()
    assert left == pytest.approx(10.0 + PRIOR["task"] * 10.0 / PRIOR["speculative"])
    eta.seen(SimpleNamespace(key="k1", stage_key=None))  # a second record of a finished item
    eta.seen(SimpleNamespace(key="nope", stage_key=None))  # not planned
    assert eta.left() == pytest.approx(left)
    assert eta.timeline == [("speculative", 10.0, None)]


def test_a_batch_arrives_whole_with_its_first_record():
    """A served target's levels are measured together and yielded at the end of its sweep:
    when the first arrives, its time is shared by all, and none of them is still to come
    (the old estimate charged the first the whole sweep and said 3x too much until the rest
    arrived)."""
    now = [0.0]
    kinds = ["serving"] * 4 + ["serving"] * 4
    batches = ["serving s fp32"] * 4 + ["serving s w8a8"] * 4
    eta = Eta(_planned(kinds, batches), lambda k: False, clock=lambda: now[0])
    now[0] = 200.0
    eta.seen(SimpleNamespace(key="k2", stage_key=None))
    assert [t[1] for t in eta.timeline] == [50.0] * 4
    assert eta.left() == pytest.approx(200.0)  # the other target's four levels, 50 s each
    for k in ("k0", "k1", "k3"):  # the rest of the batch: already counted
        eta.seen(SimpleNamespace(key=k, stage_key=None))
    assert len(eta.timeline) == 4 and eta.left() == pytest.approx(200.0)


@pytest.mark.parametrize("path", TIMELINES, ids=lambda p: p.stem)
@pytest.mark.parametrize("slower", [1.0, 3.0])
def test_within_a_factor_of_two_after_a_fifth_of_a_recorded_run(slower, path):
    recorded = json.loads(path.read_text())["timeline"]
    timeline = [(k, s * (1.0 if k in BUILDS else slower), *rest) for k, s, *rest in recorded]
    total = sum(e[1] for e in timeline)
    checked = 0
    for elapsed, true_left, estimate in replay(timeline):
        if elapsed >= 0.2 * total and true_left > 30:
            assert estimate is not None
            assert 0.5 <= estimate / true_left <= 2.0, (elapsed, true_left, estimate)
            checked += 1
    assert checked >= 8  # a batched timeline has a point per batch, not per item

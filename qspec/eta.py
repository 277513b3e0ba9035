"""Time left in a whole run, from measured per-item rates of every stage still to come.

Every record the run will write (plan.planned) is an item of a kind: a variant build (per
precision: a GPTQ build takes minutes, a float one seconds), a quality pass, a generation
cell of each kind, a served level, a task run, a lossless check. When an item's first record
arrives, the time since the previous item finished is charged to its kind. The time left is
the sum, over the items still to come, of their kind's measured mean; a kind not measured yet
is costed from PRIOR (seconds per item in one default run on 2 CPU cores) scaled by how this
run's measured items compare with their priors. Before any item has finished there is no
estimate: nothing is shown rather than a guess.

Torch-free.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

# Seconds per item in one default run on 2 cores (Intel Xeon, vLLM slice included), from its
# timeline in run.json: only their ratios matter once anything has been measured.
PRIOR = {
    "variant": 9.0,
    "variant gptq-int4": 75.0,  # a first build; 7 s from the cache
    "head": 150.0,  # a draft head trained (collect ~40 s + 40 steps); seconds from the cache
    "quality": 19.0,
    # a generation group's records arrive together when it ends: its first (target-only)
    # record is charged the group's time, the rest almost none
    "target_only": 38.0,
    "speculative": 5.0,
    "hf_target_only": 1.0,
    "hf_assisted": 1.0,
    "serving": 29.0,
    "task": 11.0,
    "task_lossless": 7.0,
}
DEFAULT_PRIOR = 15.0
# records closer together than this were yielded at once (a generation group, a served
# target's sweep): their time is shared among them
BATCH_GAP_S = 0.5


def item_kind(record) -> str:
    """The cost class of a planned or written record."""
    kind = str(record.kind)
    if kind == "variant" and getattr(record, "precision", None) == "gptq-int4":
        return "variant gptq-int4"
    return kind


class Eta:
    """Feed it each written record (`seen`); `left()` is the estimate in seconds, or None."""

    def __init__(self, planned: list, done: Callable[[str], bool], clock=time.monotonic):
        self.clock = clock
        self.last = clock()
        # planned items still to come: key (and stage key) -> the item's kind
        self.todo: dict[str, str] = {}
        self.items: dict[str, set[str]] = {}  # an item's id -> its keys, in plan order
        self.kind_of: dict[str, str] = {}
        for p in planned:
            if any(done(k) for k in p.keys):
                continue
            ident = min(p.keys)
            self.items[ident], self.kind_of[ident] = set(p.keys), item_kind(p.record)
            for k in p.keys:
                self.todo[k] = ident
        self.spent: dict[str, float] = {}  # seconds charged per kind (closed batches)
        self.count: Counter = Counter()
        self.batch: list[str] = []  # the kinds of the records that arrived together just now
        self.batch_s = 0.0
        self.timeline: list[tuple[str, float]] = []  # (kind, seconds) of each finished item

    def seen(self, record) -> None:
        ident = next((self.todo[k] for k in (record.key, record.stage_key) if k in self.todo), None)
        if ident is None:
            return
        for k in self.items.pop(ident):
            self.todo.pop(k, None)
        now = self.clock()
        kind, gap = self.kind_of[ident], now - self.last
        self.last = now
        if self.batch and gap < BATCH_GAP_S:  # one more of the records a stage yields at once
            del self.timeline[-len(self.batch) :]
            self.batch.append(kind)
            self.batch_s += gap
        else:
            self._close()
            self.batch, self.batch_s = [kind], gap
        # a batch's time is shared by its items: a group's cells all ran in that time
        share = self.batch_s / len(self.batch)
        self.timeline += [(k, round(share, 3)) for k in self.batch]

    def _close(self) -> None:
        share = self.batch_s / len(self.batch) if self.batch else 0.0
        for k in self.batch:
            self.spent[k] = self.spent.get(k, 0.0) + share
            self.count[k] += 1

    def _rates(self) -> tuple[dict[str, float], Counter]:
        spent, count = dict(self.spent), Counter(self.count)
        for k in self.batch:
            spent[k] = spent.get(k, 0.0) + self.batch_s / len(self.batch)
            count[k] += 1
        return spent, count

    def left(self) -> float | None:
        spent, count = self._rates()
        if not count:
            return None
        # how this machine compares with the priors' one; builds say little (a cached build
        # takes seconds, a first one minutes): until anything else has finished, the priors
        timed = [k for k in count if not k.startswith("variant")]
        prior_done = sum(PRIOR.get(k, DEFAULT_PRIOR) * count[k] for k in timed)
        scale = sum(spent[k] for k in timed) / prior_done if prior_done else 1.0
        costs = []
        for ident in self.items:
            kind = self.kind_of[ident]
            known = count[kind]
            costs.append(spent[kind] / known if known else PRIOR.get(kind, DEFAULT_PRIOR) * scale)
        if not costs:
            return 0.0
        # the item under way has run for a while already
        return sum(costs) - min(costs[0], self.clock() - self.last)


def replay(timeline: list[tuple[str, float]]) -> list[tuple[float, float, float | None]]:
    """(elapsed, true time left, estimate) after each item of a recorded run's timeline: how
    far the estimate was off, as a user watching that run would have seen it."""
    from types import SimpleNamespace

    now = [0.0]
    planned = [
        SimpleNamespace(keys={f"k{i}"}, record=SimpleNamespace(kind=kind, precision=None))
        for i, (kind, _) in enumerate(timeline)
    ]
    for p, (kind, _) in zip(planned, timeline, strict=True):
        if kind == "variant gptq-int4":
            p.record = SimpleNamespace(kind="variant", precision="gptq-int4")
    eta = Eta(planned, lambda k: False, clock=lambda: now[0])
    total = sum(s for _, s in timeline)
    out = []
    for i, (_, seconds) in enumerate(timeline):
        now[0] += seconds
        eta.seen(SimpleNamespace(key=f"k{i}", stage_key=None))
        last_of_batch = i + 1 == len(timeline) or timeline[i + 1][1] >= BATCH_GAP_S
        if last_of_batch:  # what the terminal shows once the records that came together are in
            out.append((now[0], total - now[0], eta.left()))
    return out

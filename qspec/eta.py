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

# Seconds per item in one default run on 2 cores (a fresh clone on an Intel Xeon standing in
# for AVX2, vLLM's slice included), from its timeline in run.json. A generation group and a
# served target's sweep are batches (plan.Planned.batch) that share their time evenly, so
# what matters there is a batch's sum (a target alone, its drafts, transformers' peer); and
# only ratios matter once anything has been measured.
PRIOR = {
    "variant": 28.0,  # the first also converts the default model
    "variant gptq-int4": 95.0,  # a first build; 7 s from the cache
    "head": 60.0,  # a draft head trained (teacher-forced pass + 40 steps); seconds from the cache
    "quality": 30.0,
    "target_only": 30.0,
    "speculative": 10.0,
    "hf_target_only": 5.0,
    "hf_assisted": 5.0,
    "serving": 66.0,  # per level and pairing: server starts and repeats included
    "task": 14.0,
    "task_lossless": 8.0,
}
DEFAULT_PRIOR = 15.0
# kinds whose time says nothing of this machine's speed: a first build takes a minute, a cached
# one seconds (and "variant ..." kinds, all builds)
BUILDS = ("head",)


def item_kind(record) -> str:
    """The cost class of a planned or written record."""
    kind = str(record.kind)
    if kind == "variant" and getattr(record, "precision", None) == "gptq-int4":
        return "variant gptq-int4"
    return kind


class Eta:
    """Feed it each written record (`seen`); `left()` is the estimate in seconds, or None.

    Items planned in one batch (plan.Planned.batch: a generation cell group, a served target's
    sweep) are measured together and yielded at once: when the first of them arrives, the time
    since the previous item is shared by the whole batch, and none of it is still to come.
    """

    def __init__(self, planned: list, done: Callable[[str], bool], clock=time.monotonic):
        self.clock = clock
        self.last = clock()
        # planned items still to come: key (and stage key) -> the item's id
        self.todo: dict[str, str] = {}
        self.items: dict[str, set[str]] = {}  # an item's id -> its keys, in plan order
        self.kind_of: dict[str, str] = {}
        self.batch_of: dict[str, str | None] = {}
        for p in planned:
            if any(done(k) for k in p.keys):
                continue
            ident = min(p.keys)
            self.items[ident], self.kind_of[ident] = set(p.keys), item_kind(p.record)
            self.batch_of[ident] = getattr(p, "batch", None)
            for k in p.keys:
                self.todo[k] = ident
        self.spent: dict[str, float] = {}  # seconds charged per kind
        self.count: Counter = Counter()
        # (kind, seconds, batch) of each finished item, a batch's time shared by its items
        self.timeline: list[tuple[str, float, str | None]] = []

    def seen(self, record) -> None:
        ident = next((self.todo[k] for k in (record.key, record.stage_key) if k in self.todo), None)
        if ident is None:
            return
        batch = self.batch_of[ident]
        group = [ident] + [
            i for i in self.items if i != ident and batch and self.batch_of[i] == batch
        ]
        now = self.clock()
        share = (now - self.last) / len(group)
        self.last = now
        for i in group:
            for k in self.items.pop(i):
                self.todo.pop(k, None)
            kind = self.kind_of[i]
            self.spent[kind] = self.spent.get(kind, 0.0) + share
            self.count[kind] += 1
            self.timeline.append((kind, round(share, 3), batch))

    def left(self) -> float | None:
        if not self.count:
            return None
        # how this machine compares with the priors' one; builds say little (a cached build
        # takes seconds, a first one minutes): until anything else has finished, the priors
        timed = [k for k in self.count if not k.startswith("variant") and k not in BUILDS]
        prior_done = sum(PRIOR.get(k, DEFAULT_PRIOR) * self.count[k] for k in timed)
        scale = sum(self.spent[k] for k in timed) / prior_done if prior_done else 1.0
        costs = []
        for ident in self.items:
            kind = self.kind_of[ident]
            known = self.count[kind]
            mean = self.spent[kind] / known if known else PRIOR.get(kind, DEFAULT_PRIOR) * scale
            costs.append(mean)
        if not costs:
            return 0.0
        # the work under way (the next item, or the whole batch it belongs to) has run a while
        first = next(iter(self.items))
        batch = self.batch_of[first]
        under_way = sum(
            c
            for i, c in zip(self.items, costs, strict=True)
            if i == first or (batch and self.batch_of[i] == batch)
        )
        return sum(costs) - min(under_way, self.clock() - self.last)


def replay(timeline: list) -> list[tuple[float, float, float | None]]:
    """(elapsed, true time left, estimate) after each item of a recorded run's timeline, as a
    user watching that run would have seen it. Entries are (kind, seconds) or (kind, seconds,
    batch): a batch's items arrive together, when its whole time has passed."""
    from types import SimpleNamespace

    entries = [(e[0], e[1], e[2] if len(e) > 2 else None) for e in timeline]
    if all(len(e) == 2 for e in timeline):  # an older timeline: records within half a second
        entries = _inferred_batches(entries)  # of the one before came with it
    now = [0.0]
    planned = []
    for i, (kind, _, batch) in enumerate(entries):
        precision = "gptq-int4" if kind == "variant gptq-int4" else None
        rec = SimpleNamespace(kind="variant" if precision else kind, precision=precision)
        planned.append(SimpleNamespace(keys={f"k{i:05d}"}, record=rec, batch=batch))
    eta = Eta(planned, lambda k: False, clock=lambda: now[0])
    total = sum(s for _, s, _ in entries)
    out, i = [], 0
    while i < len(entries):
        batch = entries[i][2]
        j = i + 1
        while batch is not None and j < len(entries) and entries[j][2] == batch:
            j += 1
        now[0] += sum(s for _, s, _ in entries[i:j])  # the batch's items arrive together
        for k in range(i, j):
            eta.seen(SimpleNamespace(key=f"k{k:05d}", stage_key=None))
        out.append((now[0], total - now[0], eta.left()))
        i = j
    return out


def _inferred_batches(entries: list[tuple]) -> list[tuple]:
    """Batches of a timeline recorded before they were planned: an item that finished within
    a second of the one before it was yielded with it."""
    out, batch = [], 0
    for i, (kind, seconds, _) in enumerate(entries):
        if i == 0 or seconds >= 1.0:
            batch += 1
        out.append((kind, seconds, f"b{batch}"))
    return out

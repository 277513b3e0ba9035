"""vLLM's speculative-decoding counters, read from its Prometheus /metrics page.

The counters are cumulative over the server's life, so a level's acceptance is the difference
of two readings around its requests (`after - before`). Names as vLLM 0.32 exports them:
vllm:spec_decode_num_drafts_total (verify steps that drafted), ..._num_draft_tokens_total,
..._num_accepted_tokens_total and ..._num_accepted_tokens_per_pos_total{position="i"}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

PREFIX = "vllm:spec_decode_num_"
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class SpecCounters:
    """One reading (or the difference of two) of the spec-decode counters."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    per_position: tuple[int, ...] = ()  # accepted at draft position i
    present: bool = False  # the server exports them (it was started with a speculative config)

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        return self._combine(before, -1)

    def __add__(self, other: SpecCounters) -> SpecCounters:
        return self._combine(other, 1)

    def _combine(self, other: SpecCounters, sign: int) -> SpecCounters:
        width = max(len(self.per_position), len(other.per_position))
        mine = self.per_position + (0,) * (width - len(self.per_position))
        theirs = other.per_position + (0,) * (width - len(other.per_position))
        return SpecCounters(
            self.drafts + sign * other.drafts,
            self.draft_tokens + sign * other.draft_tokens,
            self.accepted + sign * other.accepted,
            tuple(a + sign * b for a, b in zip(mine, theirs, strict=True)),
            self.present or other.present,
        )

    @property
    def gamma(self) -> int:
        """Draft positions the server exports: its num_speculative_tokens."""
        return len(self.per_position)


def parse_counters(text: str) -> SpecCounters:
    """The spec-decode counters in a /metrics page, summed over engines and models."""
    totals: dict[str, float] = {}
    positions: dict[int, float] = {}
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        m = SAMPLE.match(line)
        if m is None:
            continue
        name, value = m["name"].removeprefix(PREFIX), float(m["value"])
        if name == "accepted_tokens_per_pos_total":
            labels = dict(LABEL.findall(m["labels"] or ""))
            pos = int(labels.get("position", -1))
            if pos >= 0:
                positions[pos] = positions.get(pos, 0.0) + value
        elif name.endswith("_total"):
            totals[name] = totals.get(name, 0.0) + value
    if not totals:
        return SpecCounters()
    width = max(positions) + 1 if positions else 0
    return SpecCounters(
        drafts=int(totals.get("drafts_total", 0)),
        draft_tokens=int(totals.get("draft_tokens_total", 0)),
        accepted=int(totals.get("accepted_tokens_total", 0)),
        per_position=tuple(int(positions.get(i, 0)) for i in range(width)),
        present=True,
    )


def read_counters(url: str, headers: dict | None = None, timeout_s: float = 10) -> SpecCounters:
    resp = httpx.get(f"{url}/metrics", headers=headers, timeout=timeout_s)
    resp.raise_for_status()
    return parse_counters(resp.text)


IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def requests_in_flight(url: str, headers: dict | None = None) -> float:
    """vllm:num_requests_running + waiting: zero once a level's requests are all done."""
    resp = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    resp.raise_for_status()
    return in_flight(resp.text)


def in_flight(text: str) -> float:
    """The two gauges in a /metrics page, labelled or not, summed over engines and models
    (one rule: the sample's name, never a prefix of a longer name)."""
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m["name"] in IN_FLIGHT:
            total += float(m["value"])
    return total

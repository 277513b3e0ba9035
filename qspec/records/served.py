"""The served engine's record: one (target, draft, gamma, mode, concurrency level) measured in
vLLM, with latency percentiles, acceptance from the engine's own counters, and the speedup
against vLLM's target alone at the same level."""

from __future__ import annotations

from typing import Literal

from qspec.records.base import Kind, Mode, Part, Record
from qspec.records.cell import Spread


class Percentiles(Part):
    """A latency over every request of a level (seconds), with how many samples stand behind it."""

    p50: float
    p95: float
    p99: float
    mean: float
    n: int


class ServingRecord(Record):
    """One concurrency level of one served pairing (or of the target alone: draft None)."""

    kind: Literal[Kind.SERVING] = Kind.SERVING
    engine: str = "vllm"
    suite: str
    target: str  # the target precision, or an existing deployment's model id
    draft: str | None = None
    gamma: int = 0
    mode: Mode = "greedy"
    concurrency: int
    method: str | None = None  # vLLM's speculative method: draft_model, ngram, ...
    speculative_config: dict | None = None  # as passed to the server
    server: str | None = None  # "started by qspec" or the url of an existing deployment
    engine_version: str | None = None
    hardware: str | None = None
    reference: str | None = None
    log_tail: list[str] = []  # the server's last log lines when it failed
    # workload: every level runs the suite's prompts round-robin, streamed
    n_prompts: int | None = None
    n_requests: int | None = None  # per repeat
    repeats: int | None = None
    max_new_tokens: int | None = None
    failed_requests: int | None = None
    # throughput (means over repeats; each repeat's wall time from first send to last token)
    output_tokens: int | None = None  # over every repeat
    output_tokens_per_s: float | None = None  # all requests together, geometric mean of repeats
    output_tokens_per_s_ci95: list[float] | None = None  # over repeats, in log space
    tokens_per_s_per_request: float | None = None  # mean of each request's tokens / e2e
    requests_per_s: float | None = None
    goodput_requests_per_s: float | None = None  # within slo_ttft_s and slo_tpot_s
    slo: dict | None = None
    # latency: TPOT, not ITL, is the per-token figure under speculative decoding (a chunk of
    # several accepted tokens is one inter-token gap)
    ttft_s: Percentiles | None = None
    tpot_s: Percentiles | None = None
    itl_s: Percentiles | None = None
    e2e_s: Percentiles | None = None
    tokens_per_chunk: float | None = None  # streamed tokens per chunk (1 without drafts)
    # acceptance from vLLM's /metrics counters, deltas around the level's timed requests
    drafts: int | None = None  # verify steps that drafted
    draft_tokens: int | None = None
    accepted: int | None = None
    acceptance_rate: float | None = None  # accepted / draft tokens (vLLM's definition)
    acceptance_rate_ci95: list[float] | None = None  # Wilson, n = draft_tokens
    mean_acceptance_length: float | None = None  # 1 + accepted / drafts (bonus token included)
    position_acceptance_unconditional: list[float] = []  # accepted at i / drafts
    # per request, from vLLM's per-request spec-decode metrics: p10/p50/p90 across requests
    per_request_acceptance_rate: Spread | None = None
    per_request_acceptance_length: Spread | None = None
    # against vLLM's target alone at the same level, paired per request (same prompt, same
    # slot in the schedule, the two servers alternated repeat by repeat)
    speedup: float | None = None  # geometric mean of per-request tokens/s ratios
    speedup_ci95: list[float] | None = None
    speedup_pairs: int | None = None
    speedup_decode: float | None = None  # the same on 1/TPOT (prefill excluded)
    speedup_decode_ci95: list[float] | None = None
    speedup_decode_pairs: int | None = None
    throughput_ratio: float | None = None  # total output tokens/s over the target alone's
    # greedy: each request's tokens equal to the target alone's of the same prompt and level
    lossless: bool | None = None
    lossless_mismatches: list[str] = []
    # greedy: this server's tokens at this level equal to its own at the lowest level (vLLM's
    # batched kernels need not be batch-invariant)
    same_as_lowest_concurrency: bool | None = None
    outputs: dict[str, list[int]] = {}  # prompt id -> greedy tokens at this level (repeat 0)

"""The served engine's record: one (target, draft, gamma, mode, concurrency level) measured in
vLLM, with latency percentiles, acceptance from the engine's own counters, and the speedup
against vLLM's target alone at the same level."""

from __future__ import annotations

from typing import Literal

from qspec.records.base import Kind, Mode, Percentiles, Record
from qspec.records.cell import Spread

__all__ = ["Percentiles", "ServingRecord"]


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
    # the kernels vLLM chose for the quantized linear layers, from its log ("Selected
    # CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"); [] for a float model
    vllm_kernels: list[str] = []
    # workload: every level runs the suite's prompts round-robin, streamed
    n_prompts: int | None = None
    n_requests: int | None = None  # per repeat
    repeats: int | None = None
    max_new_tokens: int | None = None
    failed_requests: int | None = None
    # how the servers of one target were started on the device: "together" (all up during the
    # sweep; on a GPU each started once the one before is up, so that vLLM's memory profile
    # sees its own allocations only) or "one at a time" (they do not fit the GPU together:
    # per repeat each server is started, swept and stopped before the next); None: a deployment
    launch: str | None = None
    # on a GPU: this server's --gpu-memory-utilization (weights of target and draft + KV cache
    # of the highest level at max_model_len + a margin, over the device's total memory)
    gpu_memory_utilization: float | None = None
    # throughput (geometric means over repeats; each repeat's wall time from first send to last
    # token)
    output_tokens: int | None = None  # over every repeat
    output_tokens_per_s: float | None = None  # all requests together, geometric mean of repeats
    output_tokens_per_s_ci95: list[float] | None = None  # over repeats, in log space
    # each repeat's mean of its requests' tokens / e2e, geometric mean over repeats
    tokens_per_s_per_request: float | None = None
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
    # against vLLM's target alone at the same level, paired by repeat: this level's pass over
    # the target alone's pass of the same repeat (the servers alternate within a repeat). The
    # requests of one pass share batches, so they are not independent samples: n = repeats,
    # each interval Student's t on the log ratios over repeats (with 2 repeats, t = 12.7)
    # speedup: geometric mean over repeats of (mean per-request tokens/s) / (the target
    # alone's), i.e. tokens_per_s_per_request / the target alone's
    speedup: float | None = None
    speedup_ci95: list[float] | None = None
    speedup_pairs: int | None = None  # repeats paired (not requests)
    speedup_decode: float | None = None  # the same on per-request 1/TPOT (prefill excluded)
    speedup_decode_ci95: list[float] | None = None
    speedup_decode_pairs: int | None = None
    # geometric mean over repeats of total output tokens/s over the target alone's: the same
    # mean as output_tokens_per_s, so it equals output_tokens_per_s / the target alone's
    throughput_ratio: float | None = None
    throughput_ratio_ci95: list[float] | None = None
    throughput_ratio_pairs: int | None = None
    speedup_interval: str | None = None  # n = repeats behind the intervals, and how wide they are
    # greedy: each request's tokens equal to the target alone's of the same prompt and level
    lossless: bool | None = None
    lossless_mismatches: list[str] = []
    # greedy: this server's tokens at this level equal to its own at the lowest level (vLLM's
    # batched kernels need not be batch-invariant)
    same_as_lowest_concurrency: bool | None = None
    outputs: dict[str, list[int]] = {}  # prompt id -> greedy tokens at this level (repeat 0)
    # the target alone at the lowest level, greedy, on a CPU: qspec's own loop on the same
    # prompts, timed between vLLM's passes (tokens/s over the prompts, one request at a time),
    # and its ratio to vLLM's output tokens/s, paired by repeat (n = repeats)
    qspec_tokens_per_s: float | None = None
    qspec_over_vllm: float | None = None
    qspec_over_vllm_ci95: list[float] | None = None
    qspec_over_vllm_pairs: int | None = None
    # how qspec's loop computes this target: "native" (its own dtype's kernels), or a quantized
    # format's "simulated" numerics (dequantized weights, activations quantize-dequantized in
    # float: its speed is not the format's) or "kernels"
    qspec_numerics: str | None = None

"""The generation cell's record: one (target, draft, gamma, mode, draft length) measured by
qspec's loop or by transformers' peer, and the parts it is made of."""

from __future__ import annotations

from typing import Literal

from qspec.records.base import Kind, Mode, Part, Percentiles, Record


class Output(Part):
    """One prompt's generated tokens in one cell."""

    id: str
    category: str = ""
    tokens: list[int] = []
    text: str = ""
    tokens_per_s: float | None = None
    ttft_s: float | None = None
    steps: int | None = None
    # this prompt's own acceptance (per-request figures)
    acceptance_rate: float | None = None
    alpha_measured: float | None = None
    tau: float | None = None


class Roofline(Part):
    """How close a decode or verify step comes to the memory-bandwidth bound (measure/roofline.py)."""

    kind: Literal["decode", "verify"]
    bytes_per_step: int
    step_s_p50: float
    step_samples: int
    achieved_gbps: float
    bandwidth_gbps: float
    fraction: float


class Divergence(Part):
    """Where a greedy speculative output first leaves the target's own, and how close the
    target's call was there: a near-tie, or a real fault (measure/invariance.py)."""

    id: str = ""  # the prompt
    position: int
    target_token: int | None = None  # None where that output had already ended
    speculative_token: int | None = None
    top1_top2_margin: float
    speculative_gap: float | None = None  # the target's top-1 logit minus the speculative token's


class Spread(Part):
    """A figure's spread across requests (prompts)."""

    p10: float
    p50: float
    p90: float
    n: int


class GenerationRecord(Record):
    """One generation cell: target-only, speculative through qspec's engine, or transformers' peer.

    Engine cells (target_only, speculative) fill the acceptance and latency figures; the
    transformers peer (hf_assisted, and its own target alone, hf_target_only: transformers'
    plain generate) has throughput, memory, outputs and acceptance (its steps counted in target
    tokens), but no per-step latency.
    """

    kind: Literal[Kind.TARGET_ONLY, Kind.SPECULATIVE, Kind.HF_TARGET_ONLY, Kind.HF_ASSISTED]
    suite: str
    target: str
    draft: str | None = None
    gamma: int = 0
    mode: Mode = "greedy"
    draft_skip: list[int] | None = None  # a layer-skip draft: the decoder layers it leaves out
    # a draft with another tokenizer: the shared/draft-only/target-only token counts, and the
    # draft-model tokens decoded per target token drafted (acceptance counts target tokens)
    cross_tokenizer: dict | None = None
    draft_length: str = "fixed"  # fixed gamma, confidence stopping or the heuristic schedule
    mean_drafted: float | None = None  # drafts per drafting step (gamma when fixed)
    # fixed-gamma cells: decode tokens/s had each step drafted exactly what it would accept
    oracle_decode_tokens_per_s: float | None = None
    oracle_speedup_decode: float | None = None
    reference: str | None = None  # the reference target precision of the run
    hardware: str | None = None  # one-line label of what it was measured on
    # workload
    n_prompts: int | None = None
    repeats: int | None = None
    outputs: list[Output] = []
    # throughput and latency
    tokens: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None
    ttft_s_mean: float | None = None
    ttft_s_p50: float | None = None
    # as vLLM names them, so that the two engines' figures mean the same: inter-token latency,
    # one gap per step (a step's tokens arrive together, as one streamed chunk does), and time
    # per output token, one per request: (end-to-end - TTFT) / (tokens - 1)
    itl_s: Percentiles | None = None
    tpot_s: Percentiles | None = None
    e2e_s_p50: float | None = None
    decode_tokens_per_s: float | None = None  # after the first token (prefill excluded)
    draft_s: float | None = None  # summed over every timed step of every repeat
    verify_s: float | None = None
    draft_prefill_s: float | None = None  # the draft's prompt forwards, timed apart
    steps_timed: int | None = None  # steps over every repeat
    step_s: float | None = None  # target-only: mean seconds per decode step
    usd_per_million_tokens: float | None = None
    price_per_device_hour: float | None = None
    # measured acceptance (measure/acceptance.py)
    steps: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    tested: int | None = None
    alpha_measured: float | None = None
    alpha_measured_ci95: list[float] | None = None  # Wilson, n = tested
    acceptance_rate: float | None = None
    acceptance_rate_ci95: list[float] | None = None  # Wilson, n = drafted
    tau: float | None = None
    tau_se: float | None = None  # standard error over steps
    accepted_histogram: list[int] = []  # steps by accepted drafts (0..gamma)
    short_full_accepts: int | None = None  # steps that drafted < gamma and accepted all
    steps_without_drafts: int | None = None
    position_acceptance: list[float | None] = []  # accepted at i / tested at i
    position_tested: list[int] = []
    position_acceptance_unconditional: list[float | None] = []  # accepted at i / drafting steps
    per_prompt_acceptance_rate: Spread | None = None
    per_prompt_tau: Spread | None = None
    # against the target-only baseline of the same target and mode, paired per generation
    speedup: float | None = None  # geometric mean of paired per-prompt ratios
    speedup_ci95: list[float] | None = None
    speedup_pairs: int | None = None  # prompts behind the interval
    speedup_decode: float | None = None  # the same, prefill excluded
    speedup_decode_ci95: list[float] | None = None
    speedup_decode_pairs: int | None = None
    lossless: bool | None = None
    lossless_mismatches: list[str] = []
    # per mismatched prompt: the first divergent position, the target's top-1/top-2 margin
    lossless_divergence: list[Divergence] = []
    target_batch_invariant: bool | None = None
    # transformers' peer cells, paired per prompt: qspec's speculative cell of the same pair
    # over this assisted cell, and qspec's target-only cell over transformers' plain generate
    # (hf_target_only). A peer's own speedup (`speedup`) is over its own target alone.
    qspec_over_hf: float | None = None
    qspec_over_hf_ci95: list[float] | None = None
    qspec_over_hf_pairs: int | None = None
    # sampled peer: the alpha its own p and q allow (mean sum_x min(p, q) over tested drafts),
    # and z = (accepted - that expectation) / its SD; |z| > 3.29 (p < 0.001) says its test was
    # not exact rejection sampling
    peer_alpha_exact: float | None = None
    peer_exact_z: float | None = None
    # predicted on the text the generation visits
    alpha_predicted: float | None = None
    alpha_predicted_se: float | None = None
    alpha_predicted_positions: int | None = None
    alpha_predicted_on: str | None = None
    alpha_gap: float | None = None  # measured - predicted
    alpha_agrees: bool | None = None  # within max(0.05, 2 standard errors of the measured)
    tau_replay: float | None = None  # greedy: the drafter replayed over the output
    alpha_replay: float | None = None
    replay_exact: bool | None = None  # replayed steps == measured steps
    tau_predicted: float | None = None
    acceptance_rate_predicted: float | None = None
    # sampled model drafts: p(argmax q), the acceptance had the drafter proposed its argmax
    # (vLLM's draft_sample_method "greedy"), and the acceptance rate it implies
    alpha_predicted_greedy_draft: float | None = None
    acceptance_rate_predicted_greedy_draft: float | None = None
    # conditional per draft position, as predicted (flat for the iid method)
    position_acceptance_predicted: list[float | None] = []
    steps_predicted: float | None = None  # per step: the expected number of steps of the run
    # "iid" (Leviathan's formulas from alpha) or "per step" (step_odds.py: drafters whose
    # steps vary, greedy replayed exactly or sampled from per-draft odds)
    prediction_method: str | None = None
    draft_cost_ratio: float | None = None  # c: draft step / target step
    verify_cost_ratio: float | None = None  # v: verify of gamma+1 tokens / target step
    speedup_predicted: float | None = None
    # memory
    peak_memory_bytes: int | None = None  # the cell's own: see peak_memory_measure
    peak_memory_measure: str | None = None
    # False: /proc/self/clear_refs refused the reset, so the peak is the process's since it
    # started (an upper bound of the cell's own rise), and peak_memory_measure says so
    peak_memory_reset: bool | None = None
    memory_rise_bytes: int | None = None  # the largest rise during one generation
    # executor = "ray": the peak of the worker process that ran this target's group alone,
    # so far (its models, caches and activations, nothing of other groups)
    group_peak_memory_bytes: int | None = None
    group_peak_memory_measure: str | None = None
    target_kv_bytes: int | None = None
    draft_kv_bytes: int | None = None
    target_weights_bytes: int | None = None
    # how it ran
    compile: bool | None = None
    compile_s: float | None = None
    compile_error: str | None = None
    kv_cache: str | None = None  # "static" or "dynamic"
    roofline: Roofline | None = None

    @property
    def is_engine(self) -> bool:
        return self.kind in (Kind.TARGET_ONLY, Kind.SPECULATIVE)

"""Every record a run writes to results.jsonl, as typed models: one name per figure.

Writers build these models (an unknown field is an error); readers get them back through
`parse`, which upgrades records from older layouts first. The field names that DESIGN.md
lists (alpha_measured, acceptance_rate, tau, speedup, lossless, ...) are kept as they are:
reports and tools outside qspec read them.

Torch-free on purpose: the report and config validation import this module.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

log = logging.getLogger("qspec")

Status = Literal["ok", "failed", "unavailable"]
Mode = Literal["greedy", "sample"]


class Kind(StrEnum):
    VARIANT = "variant"
    TARGET_ONLY = "target_only"
    SPECULATIVE = "speculative"
    HF_ASSISTED = "hf_assisted"
    QUALITY = "quality"
    PAIR_SCREEN = "pair_screen"
    TASK = "task"
    TASK_LOSSLESS = "task_lossless"


GENERATION_KINDS = (Kind.TARGET_ONLY, Kind.SPECULATIVE, Kind.HF_ASSISTED)


class Part(BaseModel):
    """A nested piece of a record (an output, a roofline): strict like the records."""

    model_config = ConfigDict(extra="forbid")


class Record(Part):
    """What every record has: a resume key, a status and, when not ok, the reason."""

    key: str = ""
    stage_key: str | None = None  # the resume key of the stage that wrote it (quality, tasks)
    status: Status = "ok"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def dump(self) -> dict[str, Any]:
        """The JSON object written to results.jsonl."""
        return self.model_dump(mode="json")


# ----------------------------------------------------------------------------- variants


class VariantRecord(Record):
    """One built (model, precision): its size and build time, or why it could not be built."""

    kind: Literal[Kind.VARIANT] = Kind.VARIANT
    model: str  # the model reference as configured
    precision: str
    model_note: str = ""  # provenance of the weights, shown in the report
    weights_bytes: int | None = None
    build_s: float | None = None
    # one (gamma+1)-token forward vs gamma+1 one-token forwards (invariance.py): a target
    # must be batch-invariant for greedy speculative output to equal its own
    batch_invariant: bool | None = None
    batch_invariance: dict[str, Any] | None = None  # positions, k, max |delta logit|, flips


# ----------------------------------------------------------------------------- generation


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
    """How close a decode or verify step comes to the memory-bandwidth bound (roofline.py)."""

    kind: Literal["decode", "verify"]
    bytes_per_step: int
    step_s_p50: float
    step_samples: int
    achieved_gbps: float
    bandwidth_gbps: float
    fraction: float


class Spread(Part):
    """A figure's spread across requests (prompts)."""

    p10: float
    p50: float
    p90: float
    n: int


class GenerationRecord(Record):
    """One generation cell: target-only, speculative through qspec's engine, or transformers' peer.

    Engine cells (target_only, speculative) fill the acceptance and latency figures; the
    transformers peer (hf_assisted) has throughput, memory and outputs only.
    """

    kind: Literal[Kind.TARGET_ONLY, Kind.SPECULATIVE, Kind.HF_ASSISTED]
    suite: str
    target: str
    draft: str | None = None
    gamma: int = 0
    mode: Mode = "greedy"
    draft_skip: list[int] | None = None  # a layer-skip draft: the decoder layers it leaves out
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
    token_latency_s_p50: float | None = None
    token_latency_s_p95: float | None = None
    token_latency_samples: int | None = None
    e2e_s_p50: float | None = None
    decode_tokens_per_s: float | None = None  # after the first token (prefill excluded)
    draft_s: float | None = None  # summed over every timed step of every repeat
    verify_s: float | None = None
    draft_prefill_s: float | None = None  # the draft's prompt forwards, timed apart
    steps_timed: int | None = None  # steps over every repeat
    step_s: float | None = None  # target-only: mean seconds per decode step
    usd_per_million_tokens: float | None = None
    price_per_device_hour: float | None = None
    # measured acceptance (metrics.acceptance)
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
    lossless_divergence: list[dict[str, Any]] = []
    target_batch_invariant: bool | None = None
    # transformers' peer cells: qspec's speculative cell of the same pair / this cell, paired
    qspec_over_hf: float | None = None
    qspec_over_hf_ci95: list[float] | None = None
    qspec_over_hf_pairs: int | None = None
    qspec_over_hf_decode: float | None = None
    qspec_over_hf_decode_ci95: list[float] | None = None
    qspec_over_hf_decode_pairs: int | None = None
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
    draft_cost_ratio: float | None = None  # c: draft step / target step
    verify_cost_ratio: float | None = None  # v: verify of gamma+1 tokens / target step
    speedup_predicted: float | None = None
    # memory
    peak_memory_bytes: int | None = None  # the cell's own: see peak_memory_measure
    peak_memory_measure: str | None = None
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


# ----------------------------------------------------------------------------- quality


class QualityRecord(Record):
    """A target variant against the reference on a suite corpus, teacher-forced (quality.py)."""

    kind: Literal[Kind.QUALITY] = Kind.QUALITY
    suite: str
    variant: str | None = None
    reference: str | None = None
    corpus: str | None = None
    positions: int | None = None  # scored corpus positions
    windows: int | None = None
    weights_bytes: int | None = None
    nll_mean: float | None = None
    ppl: float | None = None
    ppl_se: float | None = None
    ppl_ratio: float | None = None
    # paired over the same positions: mean of nll_variant - nll_reference, its SE, and
    # exp(mean +- 1.96 se)
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_se: float | None = None
    ppl_ratio_ci95: list[float] | None = None
    kl_mean: float | None = None
    kl_mean_se: float | None = None
    kl_median: float | None = None
    kl_p95: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1: float | None = None
    top1_se: float | None = None
    top1_ci95: list[float] | None = None  # Wilson, n = positions
    dp_mean: float | None = None
    dp_mean_se: float | None = None
    dp_rms: float | None = None


class PredictedAt(Part):
    """Expected tau and acceptance rate at one gamma, from corpus alpha (greedy and sampled)."""

    tau: float | None = None
    acceptance_rate: float | None = None
    tau_sample: float | None = None
    acceptance_rate_sample: float | None = None


class PairScreenRecord(Record):
    """Predicted acceptance of a (target, draft) pair on the suite corpus, before any generation."""

    kind: Literal[Kind.PAIR_SCREEN] = Kind.PAIR_SCREEN
    suite: str
    target: str
    draft: str
    on: str | None = None
    positions: int | None = None
    alpha_predicted_greedy: float | None = None
    alpha_predicted_greedy_se: float | None = None
    alpha_predicted_sample: float | None = None
    alpha_predicted_sample_se: float | None = None
    predicted: dict[str, PredictedAt] = {}  # gamma (as text) -> expectations
    sampling: dict[str, float | int] = {}


# ----------------------------------------------------------------------------- tasks


class TaskRecord(Record):
    """One lm-eval (task, metric) of one target variant."""

    kind: Literal[Kind.TASK] = Kind.TASK
    suite: str
    variant: str | None = None
    task: str
    metric: str | None = None
    value: float | None = None
    stderr: float | None = None
    n: int | None = 0  # documents evaluated
    seconds: float | None = None  # wall time of the task's lm-eval call
    higher_is_better: bool | None = None  # lm-eval's direction of the metric
    doc_scores: dict[str, float] = {}  # doc_id -> per-doc value, for paired deltas


class TaskLosslessRecord(Record):
    """One generative task decoded target-only and speculatively through the engine: same answers?"""

    kind: Literal[Kind.TASK_LOSSLESS] = Kind.TASK_LOSSLESS
    suite: str
    target: str
    draft: str
    gamma: int
    task: str | None = None
    metric: str | None = None
    accuracy_plain: float | None = None
    accuracy_speculative: float | None = None
    equal: bool | None = None
    n: int | None = 0
    outputs_identical: bool | None = None
    mismatched_docs: list[int | str] = []
    seconds_plain: float | None = None
    seconds_speculative: float | None = None
    acceptance: float | None = None  # accepted / drafted over the task


AnyRecord = Annotated[
    VariantRecord
    | GenerationRecord
    | QualityRecord
    | PairScreenRecord
    | TaskRecord
    | TaskLosslessRecord,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter = TypeAdapter(AnyRecord)
_CLASSES = {
    Kind.VARIANT: VariantRecord,
    **{k: GenerationRecord for k in GENERATION_KINDS},
    Kind.QUALITY: QualityRecord,
    Kind.PAIR_SCREEN: PairScreenRecord,
    Kind.TASK: TaskRecord,
    Kind.TASK_LOSSLESS: TaskLosslessRecord,
}

# Fields written under two names by earlier versions: old name -> the one kept.
_RENAMED = {
    Kind.QUALITY: {"tokens": "positions", "kl_se": "kl_mean_se", "rms_dp": "dp_rms"},
}


def upgrade(raw: dict) -> dict:
    """A record of an older layout in today's names: renamed fields take their new name, and
    fields this version does not know are left out (listed in the debug log)."""
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in _CLASSES:
        return raw
    out = dict(raw)
    for old, new in _RENAMED.get(Kind(kind), {}).items():
        if old in out:
            value = out.pop(old)
            if out.get(new) is None:
                out[new] = value
    known = _CLASSES[Kind(kind)].model_fields
    unknown = sorted(set(out) - set(known))
    if unknown:
        log.debug("record %s: ignoring fields %s", raw.get("key"), unknown)
        for name in unknown:
            del out[name]
    return out


def parse(raw: dict) -> Record | None:
    """A typed record, or None for a kind this version does not know (or a malformed one)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
        return None
    if raw["kind"] not in _CLASSES:
        return None
    try:
        return _ADAPTER.validate_python(upgrade(raw))
    except ValidationError as err:
        log.warning("record %s of kind %s not understood: %s", raw.get("key"), raw["kind"], err)
        return None


# ----------------------------------------------------------------------------- run.json


class RunInfo(BaseModel):
    """run.json: what the run was (config, versions, hardware, seed) and how far it got."""

    model_config = ConfigDict(extra="allow")

    config: dict[str, Any] = {}
    versions: dict[str, str | None] = {}
    hardware: dict[str, Any] = {}
    hardware_label: str | None = None
    seed: int | None = None
    memory_bandwidth: dict[str, Any] | None = None
    suites: list[str] = []
    status: str | None = None  # running, complete, partial, interrupted
    started: str | None = None
    finished: str | None = None
    cells_failed: int | None = None
    # how the cells ran: "local" (one process, one cell at a time) or "ray", with the
    # cluster's size and what each job asked for
    executor: dict[str, Any] | None = None

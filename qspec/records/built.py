"""Records of the stages around the cells: variant builds, the teacher-forced quality pass and
pair screening, and lm-eval tasks with their lossless check."""

from __future__ import annotations

from typing import Literal

from qspec.records.base import Kind, Part, Record


class Invariance(Part):
    """One (gamma+1)-token forward against gamma+1 one-token forwards (measure/invariance.py)."""

    positions: int
    k: int
    max_abs_logit_diff: float
    argmax_flips: int
    argmax_flips_per_1000: float
    max_flip_margin: float | None = None  # the largest top-1/top-2 margin at a flip
    batch_invariant: bool  # argmax never flips
    method: str = ""


class VariantRecord(Record):
    """One built (model, precision): its size and build time, or why it could not be built."""

    kind: Literal[Kind.VARIANT] = Kind.VARIANT
    model: str  # the model reference as configured
    precision: str
    model_note: str = ""  # provenance of the weights, shown in the report
    weights_bytes: int | None = None
    build_s: float | None = None
    # how it is quantized and what runs it in qspec's loop: scheme (w8a8, fp8, w4a16, ...),
    # format (compressed-tensors' int-quantized, float-quantized, pack-quantized), builder
    # (llm-compressor, gptqmodel, bitsandbytes, transformers), numerics ("kernels": the format's
    # own, or "simulated": weights dequantized as stored and, for A8 schemes, each quantized
    # linear's input quantize-dequantized per token), and the builder's record (recipe,
    # library versions, calibration text hash)
    scheme: str | None = None
    format: str | None = None
    builder: str | None = None
    numerics: str | None = None
    build_record: dict | None = None
    # one (gamma+1)-token forward vs gamma+1 one-token forwards (measure/invariance.py): a target
    # must be batch-invariant for greedy speculative output to equal its own
    batch_invariant: bool | None = None
    batch_invariance: Invariance | None = None


class HeadRecord(Record):
    """A draft head for a target variant (models/heads.py): trained here, from the cache, or a
    user's checkpoint; what it was trained on and how well it drafts on held-out text."""

    kind: Literal[Kind.HEAD] = Kind.HEAD
    model: str  # the target model reference
    name: str  # the drafter: eagle3, eagle3-matched, eagle3:<path>
    trained_on: str | None = None  # the target precision whose states it learned (None: user's)
    folder: str | None = None  # the checkpoint (EAGLE-3 layout: what vLLM loads)
    cached: bool | None = None  # loaded from the cache (or a user's folder), not trained now
    build_s: float | None = None  # this run's time to train or load it
    weights_bytes: int | None = None  # its own weights (the target's embedding is shared)
    draft_vocab_size: int | None = None
    aux_layers: list[int] = []
    # training: tokens, steps, epochs, wall seconds (collect / train), loss, seed, threads
    training: dict | None = None
    # held-out corpus text: greedy per-position agreement a_k with the target (and its n), the
    # loss, and the share of the target's greedy tokens its draft vocabulary holds
    heldout: dict | None = None


class QualityRecord(Record):
    """A target variant against the reference on a suite corpus, teacher-forced (measure/teacher_forced.py)."""

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
    # comparable across tokenizers (per-token perplexity is not): nll in bits over the UTF-8
    # bytes the scored tokens stand for; `model` names another model's variants ("draft:<p>")
    bits_per_byte: float | None = None
    bytes_scored: int | None = None
    model: str | None = None


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

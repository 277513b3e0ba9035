"""Run configuration: a typed pydantic model loaded from TOML and validated once, at the edge."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qspec.engine.draft_length import DRAFT_LENGTHS
from qspec.models.precisions import PRECISION_NAMES, check_drafter
from qspec.models.refs import BUILTIN, DEFAULT_MODEL

MAX_GAMMA = 16
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def known_precisions(precisions: list[str]) -> list[str]:
    unknown = [p for p in precisions if p not in PRECISION_NAMES]
    if unknown:
        raise ValueError(
            f"unknown precision {unknown[0]!r} (allowed: {', '.join(PRECISION_NAMES)})"
        )
    return precisions


def known_drafters(names: list[str]) -> list[str]:
    for name in names:
        problem = check_drafter(name)
        if problem:
            raise ValueError(problem)
    return names


class ModelSpec(Strict):
    """One model and the precisions to build it in."""

    ref: str = DEFAULT_MODEL
    precisions: list[str] = Field(min_length=1)
    trust_remote_code: bool = False

    @field_validator("ref")
    @classmethod
    def _plausible_ref(cls, ref: str) -> str:
        if ref in BUILTIN or Path(ref).expanduser().exists() or HUB_ID.match(ref):
            return ref
        raise ValueError(
            f"{ref!r} is neither an existing local path, a hub id like 'org/name', "
            f"nor a built-in model ({', '.join(BUILTIN)})"
        )

    @field_validator("precisions")
    @classmethod
    def _known_precisions(cls, precisions: list[str]) -> list[str]:
        return known_precisions(precisions)


class DraftSpec(ModelSpec):
    """Draft models; the precisions may also name model-free drafters such as 'ngram'."""

    precisions: list[str] = Field(min_length=1)
    # prompt lookup matches the longest suffix of ngram_max..ngram_min tokens. Chosen by
    # replaying it over fp32 greedy outputs of the default and example suites (gamma 3):
    # min 2 accepts 0.56/0.51 of its drafts against 0.33/0.23 for min 1, and wastes fewer
    # verify steps where a verify costs ~2 decode steps (CPU); min 1 is ~3% ahead where a
    # verify costs about one step.
    ngram_min: int = Field(default=2, ge=1, le=8)
    ngram_max: int = Field(default=4, ge=1, le=8)

    @model_validator(mode="after")
    def _ngram_sizes(self) -> DraftSpec:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min {self.ngram_min} > ngram_max {self.ngram_max}")
        return self

    @field_validator("precisions")
    @classmethod
    def _known_precisions(cls, precisions: list[str]) -> list[str]:
        return known_drafters(precisions)


class Sampling(Strict):
    temperature: float = Field(default=1.0, ge=0.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class QualitySettings(Strict):
    """Teacher-forced pass over each suite corpus: perplexity, KL, top-1, predicted acceptance."""

    enabled: bool = True
    # more precisions of the target model screened here only (quality against the reference,
    # batch invariance): no generation cells, no tasks
    variants: list[str] = []
    max_tokens: int = Field(default=1024, ge=16, description="scored positions per suite corpus")
    window: int = Field(default=512, ge=8)
    stride: int = Field(default=256, ge=1)
    # positions compared per variant in the batch-invariance check (a few seconds each on a
    # CPU; fewer only where a run is a smoke test)
    invariance_positions: int = Field(default=128, ge=8)

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        return known_precisions(variants)


class TaskSettings(Strict):
    """Task accuracy through lm-eval, and the greedy losslessness check on one generative task."""

    enabled: bool = True
    limit: int | None = Field(default=15, ge=1, description="documents per task (None: all)")
    lossless_check: Literal["none", "reference", "all"] = "reference"


class HeadSettings(Strict):
    """EAGLE-3 heads qspec trains (drafters eagle3 and eagle3-matched, models/heads.py): one
    teacher-forced pass of the target over the run's suite corpora, then gradient steps.

    Sized for about two minutes of a 2-core CPU: max_steps (deterministic under the run's
    seed) is about one epoch of the default corpus there; max_seconds caps it on a slower
    machine, and the head's record then says how many steps it took."""

    max_steps: int | None = Field(default=40, ge=1)
    max_seconds: float = Field(default=150, gt=0)
    # the most frequent target tokens the head may draft: its LM head costs ~6% of a
    # SmolLM2-135M step at 8192 (24% over the full 49k), and covers 97% of the target's greedy
    # tokens on held-out default-corpus text
    draft_vocab_size: int = Field(default=8192, ge=16)
    unroll: int = Field(default=3, ge=1, le=8, description="training-time-test steps")
    heldout_share: float = Field(default=0.15, gt=0, lt=1, description="of each document")
    max_tokens: int | None = Field(default=None, ge=64, description="None: every corpus token")


class RaySettings(Strict):
    """Where and how cell groups run when executor = "ray" (one worker process per group)."""

    # None: $RAY_ADDRESS when set (an existing cluster), else a local cluster started here
    address: str | None = None
    # size of a local cluster started by qspec (None: every CPU of this machine)
    num_cpus: int | None = Field(default=None, ge=1)
    # what each cell group asks Ray for: CPUs on a CPU run; GPUs (a fraction shares one) on CUDA
    cpus_per_group: float = Field(default=1.0, gt=0)
    gpus_per_group: float = Field(default=1.0, gt=0, le=1)


class VllmSettings(Strict):
    """The served engine: vLLM's OpenAI-compatible server, one per (target, draft), started from
    its own virtual environment, or an existing deployment at `url`."""

    # the interpreter of vLLM's venv; None: $QSPEC_VLLM_PYTHON, else .venvs/vllm/bin/python
    # (where the noxfile installs it)
    python: str | None = None
    # an existing server to measure instead of starting one (its pairing is whatever it serves)
    url: str | None = None
    api_key_env: str | None = None  # the environment variable holding that server's API key
    # target precisions and drafts served; vLLM on CPU loads fp32/bf16, W8A8 (int8 kernels on
    # every x86 CPU), GPTQ and W4A16 builds (AVX-512 only, in bf16), n-gram lookup and EAGLE-3
    # heads; others are recorded as unavailable with vLLM's reason. The default serves W8A8
    # (the INT8 format users deploy, the one quantized format vLLM runs with its own kernels on
    # every x86 CPU) alone and with the head trained on the fp32 reference: a head read on a
    # quantized target's hidden states. fp32 beside it (qspec / vLLM on the reference) costs
    # ~3 more minutes on 2 cores: configs/serving.toml and configs/heads.toml. A GPTQ draft needs
    # a bf16 target (a draft runs in its target's dtype and vLLM's GPTQ kernels take only
    # fp16/bf16) and, on a CPU, vLLM's AVX-512 kernels: configs/serving.toml serves them
    targets: list[str] = ["w8a8"]
    drafts: list[str] = ["eagle3"]
    gamma: int | None = Field(default=None, ge=1, le=MAX_GAMMA, description="None: max(gammas)")
    concurrency: list[int] = Field(default=[1, 4], min_length=1)
    modes: list[Literal["greedy", "sample"]] = Field(default=["greedy"], min_length=1)
    # timed passes over every level, alternating the pairing and target-alone servers. A served
    # speedup is paired by repeat (a level's pass against the target alone's pass of the same
    # repeat: the requests of one pass share batches and are not independent samples), so its
    # interval has repeats - 1 degrees of freedom: t = 12.7 with 2 repeats, 4.3 with 3. Each
    # repeat of the default (2 servers x 2 levels) costs ~45 s on a 2-core machine: 2 fit the
    # first run's 15 minutes on an AVX2 machine, and the report says how wide that leaves it
    repeats: int = Field(default=2, ge=1, le=50)
    # requests per level: at least the suite's prompts (round-robin) and this many per slot
    # (the default's 4 prompts: one request per slot at c = 4)
    requests_per_slot: int = Field(default=1, ge=1)
    # prompts per level (None: the run's max_prompts). 2 by default: vLLM's W8A8 on an AVX2
    # CPU decodes at ~6 tok/s at one request, and the first run's 15 minutes hold with 2
    max_prompts: int | None = Field(default=2, ge=1, description="None: the run's max_prompts")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    startup_timeout_s: float = Field(default=300, gt=0)
    request_timeout_s: float = Field(default=600, gt=0)
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU (GiB)")
    # on a CUDA device, each server's share of the GPU (vLLM's --gpu-memory-utilization); None:
    # computed per server from its weights, the KV cache of the highest level at max_model_len
    # and gpu_margin_gib for activations. Servers that do not fit 0.9 of the GPU together run
    # one at a time
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    gpu_margin_gib: float = Field(default=2.0, ge=0)
    # goodput counts requests within both objectives (None: not counted)
    slo_ttft_s: float | None = Field(default=None, gt=0)
    slo_tpot_s: float | None = Field(default=None, gt=0)
    extra_args: list[str] = []  # passed to the server as they are
    # how a draft model's tokens are sampled in sampled mode: "probabilistic" from its
    # distribution (the rejection sampling qspec's loop does), "greedy" its argmax treated as
    # one-hot (vLLM's default)
    draft_sample_method: Literal["probabilistic", "greedy"] = "probabilistic"

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        return known_precisions(targets)

    @field_validator("drafts")
    @classmethod
    def _known_drafts(cls, drafts: list[str]) -> list[str]:
        return known_drafters(drafts)

    @field_validator("concurrency")
    @classmethod
    def _positive_levels(cls, levels: list[int]) -> list[int]:
        bad = [c for c in levels if not 1 <= c <= 1024]
        if bad:
            raise ValueError(f"concurrency {bad[0]} out of range (allowed: 1..1024)")
        return sorted(set(levels))

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s):// address of a running server")
        return url.rstrip("/") if url else url


class RunConfig(Strict):
    # The embedded default is sized for a fresh 2-core CPU machine (15 minutes, installs
    # included): one target per precision class (float; INT8 as W8A8, the compressed-tensors
    # int8 vLLM users deploy; INT4 as bitsandbytes nf4), n-gram lookup and the reference-trained
    # EAGLE-3 head as drafts, bitsandbytes int8 screened for quality beside them.
    # configs/full.toml is the full matrix, with GPTQ int4 as a target and as a draft: its build
    # (100-130 s on 2 cores) and the INT4 copy as a draft (0.44-0.65x its target alone in every
    # measured run) did not fit the first run's 15 minutes on an AVX2 machine. w8a8 needs the
    # quantization venv; without it its cells are recorded as unavailable.
    target: ModelSpec = ModelSpec(precisions=["fp32", "w8a8", "nf4"])
    draft: DraftSpec = DraftSpec(precisions=["ngram", "eagle3"])
    # None: a sweep of 1..8 on CUDA, [3] on CPU (where each extra gamma costs minutes)
    gammas: list[int] | None = Field(default=None, min_length=1)
    repeats: int = Field(
        default=1, ge=1, le=100, description="timed passes over the prompts per cell"
    )
    modes: list[Literal["greedy", "sample"]] = Field(default=["greedy", "sample"], min_length=1)
    # which targets get sampled cells: the reference only (greedy cells already rank every
    # target, and sampled acceptance is judged on the reference), or every target
    sampled_targets: Literal["reference", "all"] = "reference"
    # drafts per step: fixed gamma, confidence stopping (gamma as the cap), or the heuristic
    # schedule (+2 after a full accept, -1 otherwise); each is a cell of its own
    draft_lengths: list[Literal[DRAFT_LENGTHS]] = Field(default=["fixed"], min_length=1)
    confidence_threshold: float = Field(default=0.4, gt=0.0, lt=1.0)
    sampling: Sampling = Sampling()
    suites: list[str] = Field(default=["default"], min_length=1)
    seed: int = 0
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    # per suite; speedup intervals are over prompts, so fewer than 3 leave them very wide
    max_prompts: int = Field(default=4, ge=1)
    warmup: int = Field(default=1, ge=0, description="untimed generations before each cell")
    # torch.compile of the one-token draft step and the (gamma+1)-token verify step.
    # None: on for CUDA (with CUDA graphs), off for CPU, where compiling costs more than it saves.
    compile: bool | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    baselines: list[Literal["target_only", "hf_assisted"]] = ["target_only", "hf_assisted"]
    # transformers' assisted generation is a timing and acceptance peer; greedy alone keeps CPU runs short
    hf_assisted_modes: list[Literal["greedy", "sample"]] = ["greedy"]
    hf_assisted_targets: Literal["reference", "all"] = "reference"
    price_per_device_hour: float | None = Field(
        default=None, ge=0, description="USD per device-hour; adds cost per million output tokens"
    )
    # bitsandbytes int8 beside W8A8, screened for quality and batch invariance: the same bit
    # width from two builders, side by side (full.toml adds GPTQ int4 beside nf4)
    quality: QualitySettings = QualitySettings(variants=["int8"])
    tasks: TaskSettings = TaskSettings()
    heads: HeadSettings = HeadSettings()
    # "local": every stage in this process, one cell after another; "ray": the stages as Ray
    # tasks, each cell group (one target variant) in a worker process of its own
    executor: Literal["local", "ray"] = "local"
    ray: RaySettings = RaySettings()
    # "qspec": qspec's own loop and its transformers peer (every stage above); "vllm": the same
    # pairings served by vLLM across concurrency levels (the [vllm] table)
    engines: list[Literal["qspec", "vllm"]] = Field(default=["qspec", "vllm"], min_length=1)
    vllm: VllmSettings = VllmSettings()

    @field_validator("gammas")
    @classmethod
    def _sane_gammas(cls, gammas: list[int] | None) -> list[int] | None:
        bad = [g for g in gammas or [] if not 1 <= g <= MAX_GAMMA]
        if bad:
            raise ValueError(f"gamma {bad[0]} out of range (allowed: 1..{MAX_GAMMA})")
        return gammas

    @model_validator(mode="after")
    def _sample_needs_temperature(self) -> RunConfig:
        if "sample" in self.modes and self.sampling.temperature == 0:
            raise ValueError("mode 'sample' needs sampling.temperature > 0 (0 is greedy)")
        return self


def resolve_defaults(cfg: RunConfig, device: str) -> RunConfig:
    """Fill in the defaults that depend on the device the run found."""
    if cfg.gammas is None:
        cfg = cfg.model_copy(update={"gammas": list(range(1, 9)) if device == "cuda" else [3]})
    if cfg.compile is None:
        cfg = cfg.model_copy(update={"compile": device == "cuda"})
    return cfg


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"{source}: {key}{shown}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: Path | None) -> RunConfig:
    """Read a TOML file (or the embedded default when path is None)."""
    if path is None:
        return RunConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    return parse_config(data, str(path))

"""What every stage of a run reads: the config, the device, the suites, the built models.

A stage is a function of a RunContext that yields records; it never writes them itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qspec.config import RunConfig
from qspec.engine.drafters import MODEL_FREE_DRAFTERS, ModelDrafter, check_same_tokenizer
from qspec.engine.layerskip import LayerSkip, decoder_layers, middle_layers, search_skip
from qspec.engine.sampling import Sampler, sampler_for
from qspec.environment import describe, versions
from qspec.models.builders import BuildContext, VariantUnavailable, build, weight_bytes
from qspec.models.precisions import parse_skip, reference_precision
from qspec.models.refs import ResolvedModel, resolve
from qspec.plan import Cell, Finished
from qspec.records import Status

log = logging.getLogger("qspec")


class Skip(Exception):
    """A cell or stage that cannot be measured (a model missing, no prompts): recorded, not fatal."""

    def __init__(self, status: Status, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Built:
    """One (model, precision) built once: the model, or why it could not be built."""

    model: torch.nn.Module | None
    status: Status
    error: str | None = None
    weights_bytes: int | None = None
    build_s: float | None = None


class Models:
    """Resolves the target and draft references, then builds each variant once, on demand."""

    def __init__(self, cfg: RunConfig, device: torch.device, calibration: list[str]):
        self.cfg, self.device, self.calibration = cfg, device, calibration
        self.built: dict[tuple[str, str], Built] = {}
        self.errors: dict[str, str] = {}  # role -> why that model cannot be used at all
        self.searches: dict[tuple[str, str], dict] = {}  # layer-skip searches, per variant
        self.target_ref = self.draft_ref = self.tokenizer = None
        try:
            self.target_ref = resolve(cfg.target.ref)
            self.tokenizer = _tokenizer(self.target_ref, cfg.target.trust_remote_code)
        except Exception as err:  # noqa: BLE001
            self.errors["target"] = (
                f"cannot load target {cfg.target.ref!r}: {type(err).__name__}: {err}"
            )
            return
        try:
            self.draft_ref = resolve(cfg.draft.ref)
            if self.draft_ref.ref != self.target_ref.ref:
                draft_tok = _tokenizer(self.draft_ref, cfg.draft.trust_remote_code)
                check_same_tokenizer(
                    self.tokenizer, draft_tok, self.target_ref.ref, self.draft_ref.ref
                )
        except Exception as err:  # noqa: BLE001
            self.errors["draft"] = (
                f"cannot use draft {cfg.draft.ref!r}: {type(err).__name__}: {err}"
            )

    @property
    def same_model(self) -> bool:
        """Target and draft are the same checkpoint (self-drafting from quantized copies)."""
        return self.draft_ref is not None and self.draft_ref.ref == self.target_ref.ref

    def ref(self, role: str) -> ResolvedModel | None:
        return self.target_ref if role == "target" else self.draft_ref

    def build(self, role: str, precision: str) -> Built:
        """The variant, built on first use; a build fault is kept as its status, never raised."""
        if role in self.errors:
            return Built(None, "failed", self.errors[role])
        ref = self.ref(role)
        spec = self.cfg.target if role == "target" else self.cfg.draft
        key = (ref.ref, precision)
        if key not in self.built:
            start = time.perf_counter()
            ctx = BuildContext(
                ref.location, self.device.type, spec.trust_remote_code, self.calibration
            )
            try:
                model = build(precision, ctx)
                self.built[key] = Built(
                    model, "ok", None, weight_bytes(model), time.perf_counter() - start
                )
            except VariantUnavailable as err:
                self.built[key] = Built(None, "unavailable", str(err))
            except Exception as err:  # noqa: BLE001 - any build fault is recorded, never fatal
                log.debug(traceback.format_exc())
                self.built[key] = Built(None, "failed", f"{type(err).__name__}: {err}")
        return self.built[key]

    def model(self, role: str, precision: str) -> torch.nn.Module:
        """The built model, or Skip with the status and reason it is missing."""
        built = self.build(role, precision)
        if built.model is None:
            reason = built.error if role in self.errors else f"{role} {precision}: {built.error}"
            raise Skip(built.status, reason)
        return built.model

    def drafter(self, name: str, target: str | None = None):
        """A fresh drafter, or Skip: n-gram lookup, a built draft variant, or a layer-skip
        draft over the cell's target variant (`target`) or a draft variant."""
        if name in MODEL_FREE_DRAFTERS:
            d = self.cfg.draft
            return MODEL_FREE_DRAFTERS[name](max_ngram=d.ngram_max, min_ngram=d.ngram_min)
        skip = parse_skip(name)
        if skip is None:
            return ModelDrafter(self.model("draft", name), name=name)
        if skip.precision is None and target is None:
            raise Skip("unavailable", f"{name}: a layer-skip draft of the target needs a target")
        role, precision = ("draft", skip.precision) if skip.precision else ("target", target)
        base = self.model(role, precision)
        if skip.search:
            layers = self.skip_search(role, precision)["skip"]
        elif skip.layers is not None:
            layers = skip.layers
        else:
            layers = middle_layers(len(decoder_layers(base)), skip.fraction)
        try:
            return ModelDrafter(LayerSkip(base, tuple(layers)), name=name)
        except ValueError as err:
            raise Skip("failed", f"{name}: {err}") from None

    def skip_search(self, role: str, precision: str) -> dict:
        """The searched skip set of a variant: once per run, and cached on disk across runs."""
        key = (role, precision)
        if key not in self.searches:
            self.searches[key] = _cached_search(self, role, precision)
        return self.searches[key]


@dataclass
class RunContext:
    cfg: RunConfig  # device defaults already resolved
    device: torch.device
    suites: dict[str, object]  # name -> loaded Suite
    work_dir: Path
    models: Models
    finished: Finished = field(default_factory=Finished)
    bandwidth: dict | None = None  # copy bandwidth of the device (run.json), for the roofline
    # Tests pass a function of the Cell that raises, to check one cell's fault stays its own.
    fault: Callable[[Cell], None] | None = None
    # The target variants this process works on (a Ray job's group); None: every one
    targets: tuple[str, ...] | None = None
    # (model ref, precision) -> batch-invariance figures, from the build stage (or, in a Ray
    # worker, from the build job's records)
    invariance: dict[tuple[str, str], dict] = field(default_factory=dict)
    # What the timing cells shared the machine with (a Ray run's concurrent workers), for
    # the hardware label of every figure; None when cells ran one at a time in one process
    concurrency: str | None = None

    def works_on(self, target: str) -> bool:
        return self.targets is None or target in self.targets

    @property
    def reference(self) -> str:
        return reference_precision(self.cfg.target.precisions, self.device.type)

    @property
    def hardware_label(self) -> str:
        """What every figure was measured on, with what it shared the machine with."""
        label = describe(self.device)
        return f"{label}; {self.concurrency}" if self.concurrency else label

    @property
    def versions(self) -> dict:
        return versions()

    def sampler(self, mode: str) -> Sampler:
        s = self.cfg.sampling
        return sampler_for(mode, s.temperature, s.top_k, s.top_p)


SEARCH_TOKENS = 128  # corpus tokens the layer-skip search scores each candidate on


def _cached_search(models: Models, role: str, precision: str) -> dict:
    """search_skip on the calibration (suite corpus) text, reusing a stored result."""
    from qspec import cache

    text = "\n\n".join(models.calibration)
    ref = models.ref(role)
    gamma = max(models.cfg.gammas)
    blob = json.dumps([ref.location, precision, gamma, SEARCH_TOKENS, text], sort_keys=True)
    entry = cache.entry_dir("skip-search", hashlib.sha256(blob.encode()).hexdigest()[:16])
    if (entry / "result.json").exists():
        cache.touch(entry)
        return json.loads((entry / "result.json").read_text())
    ids = models.tokenizer(text, add_special_tokens=False)["input_ids"][:SEARCH_TOKENS]
    if len(ids) < 2 * (gamma + 2):
        raise Skip("unavailable", "skip-search needs suite corpus text to search on")
    model = models.model(role, precision)
    result = search_skip(model, torch.tensor(ids, device=models.device), gamma)
    result.update(model=ref.ref, precision=precision, gamma=gamma)
    with cache.atomic_dir(entry) as tmp:
        (tmp / "result.json").write_text(json.dumps(result, indent=1))
    cache.touch(entry)
    return result


def _tokenizer(model: ResolvedModel, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.location, trust_remote_code=trust_remote_code)

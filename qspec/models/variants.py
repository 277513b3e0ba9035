"""The variants of one run: the target and draft references resolved, and each (model,
precision) built once, on first use, with the drafters made from them.

A build that fails is kept as its status and reason (never raised); asking for its model
raises Skip, which a stage records as that cell's or stage's status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass

import torch

from qspec.config import RunConfig
from qspec.engine.cross_tokenizer import CrossTokenizerDrafter, VocabMap, logits_rows, vocab_map
from qspec.engine.drafters import MODEL_FREE_DRAFTERS, ModelDrafter
from qspec.engine.head_drafter import HeadDrafter
from qspec.engine.layerskip import LayerSkip, decoder_layers, middle_layers
from qspec.measure.skip_search import search_skip
from qspec.models.builders import BuildContext, VariantUnavailable, build, weight_bytes
from qspec.models.heads import TrainedHead, trained_head, user_head
from qspec.models.precisions import (
    HEAD_USER,
    head_kind,
    parse_skip,
    reference_precision,
    self_precision,
)
from qspec.models.refs import ResolvedModel, resolve
from qspec.records import Skip, Status

log = logging.getLogger("qspec")


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

    def __init__(
        self,
        cfg: RunConfig,
        device: torch.device,
        calibration: list[str],
        corpus: list[str] | None = None,
    ):
        self.cfg, self.device, self.calibration = cfg, device, calibration
        self.corpus = corpus or []  # the suites' corpus text: what heads train on
        self.heads: dict[tuple[str, str], TrainedHead | Skip] = {}
        self.built: dict[tuple[str, str], Built] = {}
        self.errors: dict[str, str] = {}  # role -> why that model cannot be used at all
        self.searches: dict[tuple[str, str], dict] = {}  # layer-skip searches, per variant
        self.target_ref = self.draft_ref = self.tokenizer = self.draft_tokenizer = None
        self._vocab: VocabMap | None = None  # the shared tokens, when the tokenizers differ
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
                if draft_tok.get_vocab() != self.tokenizer.get_vocab():
                    self.draft_tokenizer = draft_tok  # drafts across tokenizers
        except Exception as err:  # noqa: BLE001
            self.errors["draft"] = (
                f"cannot use draft {cfg.draft.ref!r}: {type(err).__name__}: {err}"
            )

    @property
    def cross_tokenizer(self) -> bool:
        """The draft model's tokenizer differs from the target's (engine/cross_tokenizer.py)."""
        return self.draft_tokenizer is not None

    def tokenizer_of(self, role: str):
        return self.draft_tokenizer if role == "draft" and self.cross_tokenizer else self.tokenizer

    def _model_drafter(self, model, name: str, role: str):
        if role == "draft" and self.cross_tokenizer:
            vocab = self.vocab_map(model)
            return CrossTokenizerDrafter(model, self.tokenizer, self.draft_tokenizer, vocab, name)
        return ModelDrafter(model, name=name)

    def vocab_map(self, draft_model) -> VocabMap:
        """The shared tokens of the two vocabularies, matched once per run."""
        if self._vocab is None:
            # every target precision has the same logits rows: the first one built will do
            ref = self.target_ref.ref
            target = next(
                b.model for (r, _), b in self.built.items() if r == ref and b.model is not None
            )
            self._vocab = vocab_map(
                self.tokenizer, self.draft_tokenizer, logits_rows(target), logits_rows(draft_model)
            )
        return self._vocab

    @property
    def same_model(self) -> bool:
        """Target and draft are the same checkpoint (self-drafting from quantized copies)."""
        return self.draft_ref is not None and self.draft_ref.ref == self.target_ref.ref

    def ref(self, role: str) -> ResolvedModel | None:
        return self.target_ref if role == "target" else self.draft_ref

    def build_context(self, role: str) -> BuildContext:
        """Where a role's model is and what its builds calibrate on."""
        spec = self.cfg.target if role == "target" else self.cfg.draft
        trust = spec.trust_remote_code
        return BuildContext(self.ref(role).location, self.device.type, trust, self.calibration)

    def build(self, role: str, precision: str) -> Built:
        """The variant, built on first use; a build fault is kept as its status, never raised."""
        if role in self.errors:
            return Built(None, "failed", self.errors[role])
        key = (self.ref(role).ref, precision)
        if key not in self.built:
            start = time.perf_counter()
            ctx = self.build_context(role)
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

    def release(self) -> list[tuple[str, str]]:
        """Drop every built model (its memory back to the device: another process needs it,
        a served engine on the same GPU); returns the variants released. A later `build` or
        `model` builds a released variant again (from the on-disk cache where it has one). Its
        build figures were recorded when first built (stage 1); the rebuild's own, kept in
        `built`, feed no later record. A failed or unavailable build is kept: it stays failed."""
        import gc

        released = [key for key, b in self.built.items() if b.model is not None]
        for key in released:
            del self.built[key]
        self.heads = {k: h for k, h in self.heads.items() if isinstance(h, Skip)}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return released

    def model(self, role: str, precision: str) -> torch.nn.Module:
        """The built model, or Skip with the status and reason it is missing."""
        built = self.build(role, precision)
        if built.model is None:
            reason = built.error if role in self.errors else f"{role} {precision}: {built.error}"
            raise Skip(built.status, reason)
        return built.model

    def head_target(self, name: str, target: str | None) -> str:
        """The target precision a head is trained on: the reference for eagle3, the cell's own
        for eagle3-matched ("user" for a user's checkpoint, trained elsewhere)."""
        kind = head_kind(name)
        if kind == "reference":
            return reference_precision(self.cfg.target.precisions, self.device.type)
        return target if kind == "matched" else "user"

    def head(self, name: str, target: str | None) -> TrainedHead:
        """A draft head (models/heads.py), trained or loaded once per run, or Skip with why."""
        on = self.head_target(name, target)
        key = (name if on == "user" else head_kind(name), on)
        if key not in self.heads:
            self.heads[key] = self._head(name, on, target)
        found = self.heads[key]
        if isinstance(found, Skip):
            raise found
        return found

    def _head(self, name: str, on: str, target: str | None) -> TrainedHead | Skip:
        try:
            if on == "user":
                return user_head(name.removeprefix(HEAD_USER), self.model("target", target))
            model = self.model("target", on)
            return trained_head(
                model,
                self.target_ref.location,
                on,
                self.tokenizer,
                self.corpus,
                self.cfg.heads,
                self.cfg.seed,
            )
        except Skip as skip:
            return skip
        except Exception as err:  # noqa: BLE001 - a head that cannot be made fails its cells
            log.debug(traceback.format_exc())
            return Skip("failed", f"{name} head on {on}: {type(err).__name__}: {err}")

    def drafter(self, name: str, target: str | None = None):
        """A fresh drafter, or Skip: n-gram lookup, a built draft variant, the target model's
        own variant (self:<precision>), a draft head reading the cell's target (`target`), or
        a layer-skip draft over the cell's target variant or a draft variant."""
        if head_kind(name) is not None:
            made = self.head(name, target)
            try:
                return HeadDrafter(made.head, name, target_model=self.model("target", target))
            except ValueError as err:
                raise Skip("unavailable", f"{name}: {err}") from None
        if name in MODEL_FREE_DRAFTERS:
            d = self.cfg.draft
            return MODEL_FREE_DRAFTERS[name](max_ngram=d.ngram_max, min_ngram=d.ngram_min)
        own = self_precision(name)
        if own is not None:
            return self._model_drafter(self.model("target", own), name, "target")
        skip = parse_skip(name)
        if skip is None:
            return self._model_drafter(self.model("draft", name), name, "draft")
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
            return self._model_drafter(LayerSkip(base, tuple(layers)), name, role)
        except ValueError as err:
            raise Skip("failed", f"{name}: {err}") from None

    def skip_search(self, role: str, precision: str) -> dict:
        """The searched skip set of a variant: once per run, and cached on disk across runs."""
        key = (role, precision)
        if key not in self.searches:
            self.searches[key] = _cached_search(self, role, precision)
        return self.searches[key]


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

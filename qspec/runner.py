"""One evaluation run: plan the cells, build each variant once, measure every cell, store it.

A cell that fails (a backend missing, out of memory, a model that will not load) is
stored as failed or unavailable with its reason and the run goes on.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qspec import store
from qspec.config import RunConfig, resolve_defaults
from qspec.drafters import MODEL_FREE_DRAFTERS, ModelDrafter, check_same_tokenizer
from qspec.engine import Generation, generate
from qspec.environment import describe, hardware, pick_device, versions
from qspec.memory import peak_bytes, reset_peak
from qspec.metrics import acceptance, expected_acceptance_rate, expected_tau, latency
from qspec.models import ResolvedModel, resolve
from qspec.predict import on_policy_beta
from qspec.progress import Progress
from qspec.roofline import copy_bandwidth, roofline
from qspec.sampling import Sampler, sampler_for
from qspec.variants import (
    BuildContext,
    VariantUnavailable,
    build,
    reference_precision,
    weight_bytes,
)

log = logging.getLogger("qspec")

# Tests set this to a function of the Cell that raises (MemoryError, torch.cuda.OutOfMemoryError)
# to check that one cell's fault is recorded and the run goes on.
FAULT_HOOK = None


@dataclass(frozen=True)
class Cell:
    kind: str  # "target_only", "speculative" or "hf_assisted"
    suite: str
    target: str
    draft: str | None
    gamma: int
    mode: str


@dataclass
class EncodedPrompt:
    id: str
    category: str
    ids: torch.Tensor
    max_new_tokens: int


def plan(cfg: RunConfig, suite_names: list[str], device: str = "cpu") -> list[Cell]:
    """Target-only first for each target and mode: speculative cells need its speed and outputs."""
    cells = []
    for suite in suite_names:
        for target in cfg.target.precisions:
            for mode in cfg.modes:
                cells.append(Cell("target_only", suite, target, None, 0, mode))
                for draft in cfg.draft.precisions:
                    for gamma in cfg.gammas:
                        cells.append(Cell("speculative", suite, target, draft, gamma, mode))
                peer = cfg.hf_assisted_targets == "all" or target == reference_precision(
                    cfg.target.precisions, device
                )
                if "hf_assisted" in cfg.baselines and mode in cfg.hf_assisted_modes and peer:
                    for draft in cfg.draft.precisions:
                        cells.append(
                            Cell("hf_assisted", suite, target, draft, max(cfg.gammas), mode)
                        )
    return cells


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of one suite prompt; chat prompts go through the chat template when there is one."""
    if prompt.messages is not None and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=True
        )
        return ids if isinstance(ids, list) else ids["input_ids"]
    if prompt.prompt is not None:
        return tokenizer(prompt.prompt)["input_ids"]
    return tokenizer("\n\n".join(m["content"] for m in prompt.messages))["input_ids"]


def encode_prompts(tokenizer, suite, cfg: RunConfig, device) -> list[EncodedPrompt]:
    out = []
    for p in spread(suite.prompts, cfg.max_prompts):
        limit = min(p.max_new_tokens or cfg.max_new_tokens, cfg.max_new_tokens)
        ids = torch.tensor(prompt_ids(tokenizer, p), device=device)
        out.append(EncodedPrompt(p.id, p.category, ids, limit))
    return out


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def spread(prompts: list, n: int) -> list:
    """The first n prompts taken round-robin across categories, so small runs cover each one."""
    by_category: dict[str, list] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    queues = list(by_category.values())
    picked = []
    while len(picked) < min(n, len(prompts)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


class Variants:
    """Builds each (model, precision) once and remembers the model or why it could not be built."""

    def __init__(self, device: torch.device, calibration: list[str]):
        self.device = device
        self.calibration = calibration
        self.built: dict[tuple[str, str], object] = {}
        self.info: dict[tuple[str, str], dict] = {}

    def get(self, model: ResolvedModel, precision: str, trust_remote_code: bool):
        key = (model.ref, precision)
        if key not in self.built:
            start = time.perf_counter()
            ctx = BuildContext(
                model.location, self.device.type, trust_remote_code, self.calibration
            )
            try:
                built = build(precision, ctx)
                self.info[key] = {
                    "status": "ok",
                    "weights_bytes": weight_bytes(built),
                    "build_s": time.perf_counter() - start,
                }
            except VariantUnavailable as err:
                built = err
                self.info[key] = {"status": "unavailable", "error": str(err)}
            except Exception as err:  # noqa: BLE001 - any build fault is recorded, never fatal
                built = err
                self.info[key] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
                log.debug(traceback.format_exc())
            self.built[key] = built
        return self.built[key]


def environment_record(cfg: RunConfig, device: torch.device) -> dict:
    return {
        "config": cfg.model_dump(),
        "versions": versions(),
        "hardware": hardware(device),
        "hardware_label": describe(device),
        "seed": cfg.seed,
    }


def run_evaluation(
    cfg: RunConfig, out: Path, suites: list, *, resume: bool = False, quiet: bool = False
) -> int:
    """Run every cell; returns 0 when all cells are ok or unavailable, 1 when any failed."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    device = pick_device(cfg.device)
    cfg = resolve_defaults(cfg, device.type)
    _quiet_transformers()
    torch.manual_seed(cfg.seed)
    run = {
        **environment_record(cfg, device),
        # the roofline's bound: what this device sustains, measured before any model loads
        "memory_bandwidth": copy_bandwidth(device),
        "suites": [s.name for s in suites],
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store.write_json(out / "run.json", run)
    previous = {r["key"]: r for r in store.read(results)} if resume else {}
    if not resume and results.exists():
        results.unlink()
    state = RunState(cfg, device, suites, results, previous)
    state.bandwidth = run["memory_bandwidth"]
    try:
        state.run_all(Progress(quiet=quiet))
        run["status"] = "complete" if not state.failed else "partial"
    except KeyboardInterrupt:
        run["status"] = "interrupted"
        raise
    finally:
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        run["cells_failed"] = state.failed
        store.write_json(out / "run.json", run)
    return 1 if state.failed else 0


class RunState:
    """Everything one run holds while it measures: built models, baselines, the store."""

    def __init__(self, cfg, device, suites, results: Path, previous: dict):
        self.cfg, self.device, self.suites = cfg, device, {s.name: s for s in suites}
        self.results, self.previous = results, previous
        self.failed = 0
        calibration = [doc for s in suites for doc in _safe_corpus(s)][:64]
        self.variants = Variants(device, calibration)
        # (suite, target, mode) -> the target-only record, for speedup and losslessness
        self.baseline: dict[tuple, dict] = {}
        self.model_errors: dict[str, str] = {}
        self.model_free = MODEL_FREE_DRAFTERS
        self.bandwidth: dict | None = None  # copy bandwidth for the roofline (run.json)
        self.work_dir = results.parent

    def base_key(self) -> dict:
        """What every stored result depends on besides its own coordinates."""
        cfg = self.cfg
        return {
            "target_ref": cfg.target.ref,
            "draft_ref": cfg.draft.ref,
            "target_precisions": cfg.target.precisions,
            "draft_precisions": cfg.draft.precisions,
            "sampling": cfg.sampling.model_dump(),
            "quality": cfg.quality.model_dump(),
            "tasks": cfg.tasks.model_dump(),
            "gammas": cfg.gammas,
            "seed": cfg.seed,
            "device": self.device.type,
            "versions": versions(),
        }

    def previous_ok(self, key: str) -> bool:
        """On resume: was this cell or stage already stored as ok (or unavailable, which will not change)?"""
        done = ("ok", "unavailable")
        old = self.previous.get(key)
        if old is not None and old.get("status") in done:
            return True
        stage = [r for r in self.previous.values() if r.get("stage_key") == key]
        return bool(stage) and all(r.get("status") in done for r in stage)

    def write(self, record: dict) -> None:
        if record.get("status") == "failed":
            self.failed += 1
        store.append(self.results, record)

    def write_stage(self, stage_key: str, record: dict) -> None:
        """A stage writes several records under one resume key; each still gets a unique key."""
        ident = {
            k: record.get(k)
            for k in ("kind", "suite", "variant", "target", "draft", "task", "metric")
        }
        self.write(
            {"key": store.cell_key({"stage": stage_key, **ident}), "stage_key": stage_key, **record}
        )

    # -- models ---------------------------------------------------------------------------------
    def resolve_models(self):
        self.target_ref = self.draft_ref = None
        try:
            self.target_ref = resolve(self.cfg.target.ref)
            self.tokenizer = _tokenizer(self.target_ref, self.cfg.target.trust_remote_code)
        except Exception as err:  # noqa: BLE001
            self.model_errors["target"] = (
                f"cannot load target {self.cfg.target.ref!r}: {type(err).__name__}: {err}"
            )
            return
        self.eos = _eos_ids(self.tokenizer)
        try:
            self.draft_ref = resolve(self.cfg.draft.ref)
            if self.draft_ref.ref != self.target_ref.ref:
                draft_tok = _tokenizer(self.draft_ref, self.cfg.draft.trust_remote_code)
                check_same_tokenizer(
                    self.tokenizer, draft_tok, self.target_ref.ref, self.draft_ref.ref
                )
        except Exception as err:  # noqa: BLE001
            self.model_errors["draft"] = (
                f"cannot use draft {self.cfg.draft.ref!r}: {type(err).__name__}: {err}"
            )

    def model(self, role: str, precision: str):
        """(model, None) or (None, (status, reason))."""
        if role in self.model_errors:
            return None, ("failed", self.model_errors[role])
        spec = self.cfg.target if role == "target" else self.cfg.draft
        ref = self.target_ref if role == "target" else self.draft_ref
        built = self.variants.get(ref, precision, spec.trust_remote_code)
        if isinstance(built, Exception):
            info = self.variants.info[(ref.ref, precision)]
            return None, (info["status"], f"{role} {precision}: {info['error']}")
        return built, None

    def drafter(self, precision: str):
        if precision in MODEL_FREE_DRAFTERS:
            return MODEL_FREE_DRAFTERS[precision](max_ngram=self.cfg.draft.ngram_max), None
        model, problem = self.model("draft", precision)
        return (ModelDrafter(model, name=precision) if model is not None else None), problem

    # -- the run --------------------------------------------------------------------------------
    def run_all(self, progress: Progress):
        from qspec.stages import run_quality, run_task_stage

        self.resolve_models()
        self.record_variants()
        run_quality(self, progress)
        self.run_cells(progress)
        run_task_stage(self, progress, self.work_dir)

    def run_cells(self, progress: Progress):
        cells = plan(self.cfg, list(self.suites), self.device.type)
        prompts = {}
        with progress.task("cells", total=len(cells)) as advance:
            for cell in cells:
                advance(
                    f"{cell.kind} {cell.suite} {cell.target}/{cell.draft or '-'} g={cell.gamma} {cell.mode}"
                )
                if cell.suite not in prompts and "target" not in self.model_errors:
                    prompts[cell.suite] = encode_prompts(
                        self.tokenizer, self.suites[cell.suite], self.cfg, self.device
                    )
                self.run_cell(cell, prompts.get(cell.suite, []))

    def record_variants(self):
        """One record per built variant: weights bytes, build time, or why it is missing."""
        roles = [("target", p) for p in self.cfg.target.precisions]
        roles += [("draft", p) for p in self.cfg.draft.precisions if p not in MODEL_FREE_DRAFTERS]
        for role, precision in roles:
            if role not in self.model_errors:
                self.model(role, precision)
        for (ref, precision), info in self.variants.info.items():
            key = store.cell_key(
                {"kind": "variant", "ref": ref, "precision": precision, "device": self.device.type}
            )
            self.write(
                {
                    "key": key,
                    "kind": "variant",
                    "model": ref,
                    "precision": precision,
                    "model_note": self._note(ref),
                    **info,
                },
            )

    def _note(self, ref: str) -> str:
        for r in (self.target_ref, self.draft_ref):
            if r is not None and r.ref == ref:
                return r.note
        return ""

    def key_fields(self, cell: Cell) -> dict:
        return {
            **asdict(cell),
            "target_ref": self.cfg.target.ref,
            "draft_ref": self.cfg.draft.ref,
            "max_new_tokens": self.cfg.max_new_tokens,
            "max_prompts": self.cfg.max_prompts,
            "warmup": self.cfg.warmup,
            "repeats": self.cfg.repeats,
            "compile": self.cfg.compile,
            "sampling": self.cfg.sampling.model_dump(),
            "seed": self.cfg.seed,
            "device": self.device.type,
            "versions": versions(),
        }

    def run_cell(self, cell: Cell, prompts: list[EncodedPrompt]):
        key = store.cell_key(self.key_fields(cell))
        old = self.previous.get(key)
        if old is not None and old["status"] in ("ok", "unavailable"):
            if cell.kind == "target_only":
                self.baseline[(cell.suite, cell.target, cell.mode)] = old
            return
        record = {
            "key": key,
            **asdict(cell),
            "reference": self.reference,
            "hardware": describe(self.device),
            "status": "ok",
            "error": None,
        }
        try:
            record.update(self.measure(cell, prompts))
        except _Skip as skip:
            record.update(status=skip.status, error=skip.reason)
        except (torch.cuda.OutOfMemoryError, MemoryError) as err:
            record.update(status="failed", error=f"out of memory: {err}")
        except Exception as err:  # noqa: BLE001 - a fault in one cell never loses the others
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
            log.debug(traceback.format_exc())
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        price = self.cfg.price_per_device_hour
        if price is not None and record.get("tokens_per_s"):
            record["usd_per_million_tokens"] = price / 3600 / record["tokens_per_s"] * 1e6
            record["price_per_device_hour"] = price
        if cell.kind == "target_only" and record["status"] == "ok":
            self.baseline[(cell.suite, cell.target, cell.mode)] = record
        self.write(record)

    @property
    def reference(self) -> str:
        return reference_precision(self.cfg.target.precisions, self.device.type)

    def sampler(self, mode: str) -> Sampler:
        s = self.cfg.sampling
        return sampler_for(mode, s.temperature, s.top_k, s.top_p)

    def measure(self, cell: Cell, prompts: list[EncodedPrompt]) -> dict:
        if FAULT_HOOK is not None:
            FAULT_HOOK(cell)
        target, problem = self.model("target", cell.target)
        if problem:
            raise _Skip(*problem)
        if not prompts:
            raise _Skip("unavailable", f"suite {cell.suite!r} declares no prompts")
        drafter = None
        if cell.draft is not None:
            drafter, problem = self.drafter(cell.draft)
            if problem:
                raise _Skip(*problem)
        if cell.kind == "hf_assisted":
            return self.measure_hf(cell, target, drafter, prompts)
        return self.measure_engine(cell, target, drafter, prompts)

    def baseline_for(self, cell: Cell) -> dict | None:
        return self.baseline.get((cell.suite, cell.target, cell.mode))

    def measure_engine(self, cell: Cell, target, drafter, prompts) -> dict:
        sampler = self.sampler(cell.mode)
        compile = bool(self.cfg.compile)
        # one cache size for every prompt, the warm-up included: compiled shapes never change
        capacity = max(p.ids.numel() + p.max_new_tokens for p in prompts) + cell.gamma + 1
        run = dict(
            drafter=drafter,
            gamma=cell.gamma,
            sampler=sampler,
            eos_ids=self.eos,
            compile=compile,
            capacity=capacity,
        )
        # Compilation happens in the first warm-up; it is timed here and never counted as latency.
        # A model torch.compile cannot handle (a quantization kernel it cannot trace, say) is
        # measured eagerly instead, and the record says why.
        warmup_s, compile_error = [], None
        for _ in range(max(self.cfg.warmup, 1 if compile else 0)):
            t = time.perf_counter()
            try:
                generate(
                    target, prompts[0].ids, max_new_tokens=min(8, prompts[0].max_new_tokens), **run
                )
            except Exception as err:  # noqa: BLE001
                if not run["compile"]:
                    raise
                compile_error = f"{type(err).__name__}: {err}"[:500]
                log.warning("torch.compile failed for %s; measuring eagerly: %s", cell, err)
                compile = run["compile"] = False
            warmup_s.append(time.perf_counter() - t)
        reset_peak(self.device)
        timed: list[Generation] = []
        for _ in range(self.cfg.repeats):  # same seeds each pass: same outputs, more timing samples
            for i, p in enumerate(prompts):
                gen_rng = torch.Generator(self.device).manual_seed(self.cfg.seed + i)
                timed.append(
                    generate(
                        target, p.ids, max_new_tokens=p.max_new_tokens, generator=gen_rng, **run
                    )
                )
        gens = timed[: len(prompts)]
        peak, peak_what = peak_bytes(self.device)
        steps = [s for g in gens for s in g.steps]
        rec = {**acceptance(steps, cell.gamma), **latency(timed)}
        rec.update(
            repeats=self.cfg.repeats,
            n_prompts=len(prompts),
            compile=compile,
            # first warm-up generation (8 tokens) including compilation; None when not compiled
            compile_s=warmup_s[0] if compile else None,
            compile_error=compile_error,
            kv_cache=gens[0].kv_path,
            peak_memory_bytes=peak,
            peak_memory_measure=peak_what,
            target_kv_bytes=max(g.target_kv_bytes for g in gens),
            draft_kv_bytes=max(g.draft_kv_bytes for g in gens),
            outputs=[
                {
                    "id": p.id,
                    "category": p.category,
                    "tokens": g.tokens,
                    "text": self.tokenizer.decode(g.tokens, skip_special_tokens=True),
                    "tokens_per_s": len(g.tokens) / g.total_s if g.total_s else None,
                    "ttft_s": g.ttft_s,
                    "steps": len(g.steps),
                }
                for p, g in zip(prompts, gens, strict=True)
            ],
        )
        weights = self.variants.info.get((self.target_ref.ref, cell.target), {}).get(
            "weights_bytes"
        )
        rec["target_weights_bytes"] = weights
        all_steps = [s for g in timed for s in g.steps]
        if cell.kind == "target_only":
            rec["roofline"] = roofline(
                "decode", weights, [s.draft_s + s.verify_s for s in all_steps], self.bandwidth
            )
            rec.update(tau=1.0, step_s=(rec["draft_s"] + rec["verify_s"]) / max(len(steps), 1))
            return rec
        verify = [s.verify_s for s in all_steps if s.drafted]
        rec["roofline"] = roofline("verify", weights, verify, self.bandwidth)
        base = self.baseline_for(cell)
        rec.update(self.against_baseline(cell, rec, base))
        rec.update(self.predicted(cell, target, drafter, prompts, rec, base, sampler))
        return rec

    def against_baseline(self, cell: Cell, rec: dict, base: dict | None) -> dict:
        """Speedup over target-only decoding, and in greedy mode whether the outputs are identical."""
        if base is None:
            return {}
        out = {"speedup": rec["tokens_per_s"] / base["tokens_per_s"]}
        if cell.mode == "greedy":
            ref_out = {o["id"]: o["tokens"] for o in base["outputs"]}
            mismatches = [o["id"] for o in rec["outputs"] if o["tokens"] != ref_out.get(o["id"])]
            out.update(lossless=not mismatches, lossless_mismatches=mismatches)
        return out

    def predicted(self, cell, target, drafter, prompts, rec, base, sampler) -> dict:
        """Teacher-forced prediction on the text this generation visits: prompt + the target's greedy output."""
        greedy_base = self.baseline.get((cell.suite, cell.target, "greedy")) or base
        if greedy_base is None:
            return {}
        continuation = {o["id"]: o["tokens"] for o in greedy_base["outputs"]}
        betas = []
        for p in prompts:
            cont = continuation.get(p.id) or []
            if not cont:
                continue
            ids = torch.cat([p.ids, torch.tensor(cont, device=p.ids.device)])
            betas.append(on_policy_beta(target, drafter, ids, p.ids.numel(), sampler).cpu())
        b = torch.cat(betas) if betas else torch.empty(0)
        if b.numel() == 0:
            return {}
        alpha = float(b.mean())
        out = {
            "alpha_predicted": alpha,
            "alpha_predicted_positions": b.numel(),
            "alpha_predicted_on": "on policy: prompts + the target's own greedy continuation",
            "tau_predicted": expected_tau(alpha, cell.gamma),
            "acceptance_rate_predicted": expected_acceptance_rate(alpha, cell.gamma),
        }
        if base is not None and rec["steps"] and base.get("step_s"):
            c = (rec["draft_s"] / max(rec["drafted"], 1)) / base["step_s"]
            v = (rec["verify_s"] / rec["steps"]) / base["step_s"]
            out.update(
                draft_cost_ratio=c,
                verify_cost_ratio=v,
                speedup_predicted=out["tau_predicted"] / (cell.gamma * c + v),
            )
        return out

    def measure_hf(self, cell: Cell, target, drafter, prompts) -> dict:
        from qspec.baselines import hf_assisted

        draft_model = getattr(drafter, "model", None)
        if draft_model is None and cell.draft not in MODEL_FREE_DRAFTERS:
            raise _Skip("unavailable", "no draft model")
        sampler = self.sampler(cell.mode)
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else min(self.eos, default=0)
        )
        run = dict(
            draft_model=draft_model, gamma=cell.gamma, sampler=sampler, eos_ids=self.eos, pad_id=pad
        )
        for _ in range(self.cfg.warmup):
            hf_assisted(
                target,
                prompts[0].ids,
                max_new_tokens=min(8, prompts[0].max_new_tokens),
                seed=0,
                **run,
            )
        reset_peak(self.device)
        outputs, tokens, seconds = [], 0, 0.0
        for i, p in enumerate(prompts):
            toks, secs = hf_assisted(
                target, p.ids, max_new_tokens=p.max_new_tokens, seed=self.cfg.seed + i, **run
            )
            outputs.append(
                {
                    "id": p.id,
                    "category": p.category,
                    "tokens": toks,
                    "text": self.tokenizer.decode(toks, skip_special_tokens=True),
                }
            )
            tokens += len(toks)
            seconds += secs
        peak, peak_what = peak_bytes(self.device)
        rec = {
            "n_prompts": len(prompts),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else None,
            "outputs": outputs,
            "peak_memory_bytes": peak,
            "peak_memory_measure": peak_what,
        }
        rec.update(self.against_baseline(cell, rec, self.baseline_for(cell)))
        return rec


class _Skip(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _safe_corpus(suite) -> list[str]:
    try:
        return list(suite.corpus())
    except Exception:  # noqa: BLE001 - calibration text is optional
        return []


def _tokenizer(model: ResolvedModel, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.location, trust_remote_code=trust_remote_code)


def _eos_ids(tokenizer) -> frozenset[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)

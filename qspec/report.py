"""The HTML report of one run directory (run.json + results.jsonl), and a terminal verdict.

    write_report(run_dir, budget=None) -> run_dir / "index.html"
    summary_text(run_dir, budget=None) -> one paragraph of plain text

The page is one self-contained file: no scripts, no network requests, figures embedded as
``data:`` URIs, all strings from results escaped by Jinja2's autoescaping. Every field of every
record may be missing or null; a section that cannot be built says so instead of failing the
whole report.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, PackageLoader

from qspec import plots, store

log = logging.getLogger("qspec.report")

GEN_KINDS = ("target_only", "speculative", "hf_assisted")
MODES = ("greedy", "sample")
MAX_OUTPUT_PROMPTS = 3
MAX_OUTPUT_CHARS = 1500
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)
SMALL_MODEL_BYTES = 2 * 1024**3
MAX_VERIFY_ROWS = 12  # above this the roofline table shows one decoding mode's verify rows
MAX_ROOFLINE_FIGURE_ROWS = 30  # a taller bar chart adds nothing the table lacks


@dataclass
class Budget:
    """The quality a pairing's TARGET variant may give up against the reference."""

    max_ppl_increase_pct: float = 5.0
    max_accuracy_drop_points: float = 2.0


# ----------------------------------------------------------------------------- small helpers


def num(x) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, bool, text)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def first(rec: dict, *names):
    """The first non-null field among names (field names differ slightly between writers)."""
    for n in names:
        v = rec.get(n)
        if v is not None:
            return v
    return None


def as_list(x) -> list:
    return x if isinstance(x, list) else []


def text(x) -> str:
    return "" if x is None else str(x)


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def n_tokens(output: dict) -> int | None:
    t = output.get("tokens")
    if isinstance(t, list):
        return len(t)
    return int(t) if num(t) is not None else None


def fmt(x, digits: int = 2) -> str:
    v = num(x)
    return "—" if v is None else f"{v:,.{digits}f}"


def fmt_pct(x, digits: int = 1) -> str:
    v = num(x)
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def fmt_signed(x, digits: int = 1, unit: str = "") -> str:
    v = num(x)
    return "—" if v is None else f"{v:+.{digits}f}{unit}"


def fmt_speedup(x) -> str:
    v = num(x)
    return "—" if v is None else f"{v:.2f}×"


def fmt_bytes(x) -> str:
    v = num(x)
    if v is None:
        return "—"
    if v >= 10 * 1024**3:
        return f"{v / 1024**3:,.1f} GiB"
    return f"{v / 1024**2:,.1f} MiB"


def fmt_seconds(x) -> str:
    v = num(x)
    if v is None:
        return "—"
    if v < 1:
        return f"{1000 * v:.0f} ms" if v >= 0.01 else f"{1000 * v:.2f} ms"
    return f"{v:,.2f} s"


def fmt_int(x) -> str:
    v = num(x)
    return "—" if v is None else f"{int(round(v)):,}"


def _parse_time(s) -> _dt.datetime | None:
    if not isinstance(s, str):
        return None
    for f in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"):
        try:
            return _dt.datetime.strptime(s, f)
        except ValueError:
            pass
    try:
        return _dt.datetime.fromisoformat(s)
    except ValueError:
        return None


def _duration(started, finished) -> str | None:
    a, b = _parse_time(started), _parse_time(finished)
    if a is None or b is None or (a.tzinfo is None) != (b.tzinfo is None):
        return None
    s = int((b - a).total_seconds())
    if s < 0:
        return None
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def load_run(run_dir: Path) -> tuple[dict, list[dict], list[str]]:
    """run.json (or {}), the records (the last one per key: a resumed run rewrites cells), notes."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    meta: dict = {}
    path = run_dir / "run.json"
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                meta = loaded
            else:
                notes.append("run.json does not hold a JSON object")
        except (OSError, ValueError) as err:
            notes.append(f"run.json could not be read: {err}")
    else:
        notes.append("run.json is missing")
    if not (run_dir / "results.jsonl").exists():
        notes.append("results.jsonl is missing")
    by_key: dict = {}
    loose = []
    for r in store.read(run_dir / "results.jsonl"):
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("key"), str):
            by_key.pop(r["key"], None)
            by_key[r["key"]] = r
        else:
            loose.append(r)
    return meta, list(by_key.values()) + loose, notes


def _pos(xs: list, v) -> int:
    return xs.index(v) if v in xs else len(xs)


def _order(seen: list, preferred, keep_empty: bool = False) -> list:
    """Values in the config's order first, then any others in order of appearance."""
    out = []
    preferred = preferred if isinstance(preferred, list | tuple) else []
    for v in list(preferred) + seen:
        if isinstance(v, str) and v in seen and v not in out:
            out.append(v)
    for v in seen:
        if v not in out:
            out.append(v)
    return [v for v in out if v != "" or keep_empty]


# ----------------------------------------------------------------------------- the analysis


class Run:
    """Every number the report shows, computed once from the records."""

    def __init__(self, run_dir: Path, budget: Budget | None = None):
        self.dir = Path(run_dir)
        self.budget = budget or Budget()
        self.meta, records, self.notes = load_run(self.dir)
        by_kind = defaultdict(list)
        for r in records:
            kind = r.get("kind")
            by_kind[kind if isinstance(kind, str) else None].append(r)
        self.variants = by_kind["variant"]
        self.cells = [r for k in GEN_KINDS for r in by_kind[k]]
        self.quality = by_kind["quality"]
        self.screens = by_kind["pair_screen"]
        self.tasks = by_kind["task"]
        self.task_lossless = by_kind["task_lossless"]
        cfg = self.meta.get("config")
        self.config = cfg if isinstance(cfg, dict) else {}
        self.ok = [c for c in self.cells if c.get("status") == "ok"]
        self.spec = [c for c in self.ok if c.get("kind") == "speculative"]

        tcfg = self.config.get("target") if isinstance(self.config.get("target"), dict) else {}
        dcfg = self.config.get("draft") if isinstance(self.config.get("draft"), dict) else {}
        self.target_ref, self.draft_ref = tcfg.get("ref"), dcfg.get("ref")
        self.suites = _order(
            [text(c.get("suite")) for c in self.cells + self.quality + self.tasks],
            self.meta.get("suites") or self.config.get("suites"),
            keep_empty=True,
        )
        self.targets = _order([text(c.get("target")) for c in self.cells], tcfg.get("precisions"))
        self.drafts = _order(
            [text(c.get("draft")) for c in self.cells if c.get("draft") is not None],
            dcfg.get("precisions"),
        )
        self.modes = _order([text(c.get("mode")) for c in self.cells], MODES)
        self.cells.sort(key=self.sort_key)
        self.ok = [c for c in self.cells if c.get("status") == "ok"]
        self.spec = [c for c in self.ok if c.get("kind") == "speculative"]
        self.reference = self._reference()
        self.hardware_label = self._hardware_label()
        self.is_cpu = self._is_cpu()
        self.baseline = {}
        for c in self.ok:
            if c.get("kind") == "target_only":
                self.baseline[
                    (text(c.get("suite")), text(c.get("target")), text(c.get("mode")))
                ] = c
        self.variant_weights = self._variant_weights()
        self.vq = {v: self._variant_quality(v) for v in self._all_variants()}
        self.not_lossless = self._not_lossless()

    # -- identity and labels

    def _reference(self) -> str | None:
        for r in self.quality + self.cells:
            if r.get("reference") is not None:
                return text(r["reference"])
        return self.targets[0] if self.targets else None

    def _hardware_label(self) -> str:
        label = self.meta.get("hardware_label")
        if not label:
            labels = {text(c.get("hardware")) for c in self.cells if c.get("hardware")}
            label = " / ".join(sorted(labels)) if labels else None
        return text(label) or "unknown hardware"

    def _is_cpu(self) -> bool:
        hw = self.meta.get("hardware")
        if isinstance(hw, dict) and hw.get("device") is not None:
            return text(hw.get("device")).lower() == "cpu"
        return self.hardware_label.lower().startswith("cpu")

    def _all_variants(self) -> list[str]:
        seen = [text(v.get("precision")) for v in self.variants]
        seen += [text(q.get("variant")) for q in self.quality + self.tasks]
        return _order(seen + self.targets, self.targets + self.drafts)

    def sort_key(self, c: dict) -> tuple:
        """Suite, target, mode, kind (target-only first), draft, gamma: the config's order."""

        return (
            _pos(self.suites, text(c.get("suite"))),
            _pos(self.targets, text(c.get("target"))),
            _pos(self.modes, text(c.get("mode"))),
            _pos(list(GEN_KINDS), c.get("kind")),
            -1 if c.get("draft") is None else _pos(self.drafts, text(c.get("draft"))),
            num(c.get("gamma")) or 0,
        )

    def multi_suite(self) -> bool:
        return len(self.suites) > 1

    def label(self, c: dict, suite: bool | None = None) -> str:
        kind = c.get("kind")
        mode = text(c.get("mode"))
        if kind == "target_only":
            s = f"{text(c.get('target'))} alone, {mode}"
        else:
            s = f"{text(c.get('target'))} + {text(c.get('draft'))} γ={text(c.get('gamma'))} {mode}"
            if kind == "hf_assisted":
                s += " (HF assisted)"
        if suite if suite is not None else self.multi_suite():
            s = f"[{text(c.get('suite'))}] {s}"
        return s

    # -- memory

    def _variant_weights(self) -> dict:
        out = {}
        for v in self.variants:
            w = num(v.get("weights_bytes"))
            if w is None:
                continue
            p, m = text(v.get("precision")), v.get("model")
            out.setdefault(("any", p), w)
            if m is not None and m == self.target_ref:
                out[("target", p)] = w
            if m is not None and m == self.draft_ref:
                out[("draft", p)] = w
        return out

    def target_weights(self, target) -> float | None:
        t = text(target)
        for c in self.cells:
            if text(c.get("target")) == t and num(c.get("target_weights_bytes")) is not None:
                return num(c["target_weights_bytes"])
        return self.variant_weights.get(("target", t), self.variant_weights.get(("any", t)))

    def draft_weights(self, draft) -> float | None:
        if draft is None:
            return 0.0
        d = text(draft)
        w = self.variant_weights.get(("draft", d), self.variant_weights.get(("any", d)))
        if w is None and not any(text(v.get("precision")) == d for v in self.variants):
            return 0.0  # a model-free drafter (n-gram): no weights
        return w

    def weights_total(self, c: dict) -> float | None:
        t = self.target_weights(c.get("target"))
        d = self.draft_weights(c.get("draft")) if c.get("kind") != "target_only" else 0.0
        return t + d if t is not None and d is not None else None

    # -- quality against the budget

    def _ref_quality(self, suite: str) -> dict | None:
        for q in self.quality:
            if text(q.get("suite")) == suite and text(q.get("variant")) == self.reference:
                return q
        return None

    def ppl_delta_pct(self, q: dict) -> float | None:
        ratio = num(q.get("ppl_ratio"))
        if ratio is None:
            ref = self._ref_quality(text(q.get("suite")))
            p, rp = num(q.get("ppl")), num(ref.get("ppl")) if ref else None
            ratio = p / rp if p is not None and rp else None
        if ratio is None and text(q.get("variant")) == self.reference and num(q.get("ppl")):
            ratio = 1.0
        return None if ratio is None else 100 * (ratio - 1)

    def task_delta_points(self, t: dict) -> float | None:
        if text(t.get("variant")) == self.reference:
            return 0.0 if num(t.get("value")) is not None else None
        for r in self.tasks:
            if (
                text(r.get("variant")) == self.reference
                and text(r.get("suite")) == text(t.get("suite"))
                and text(r.get("task")) == text(t.get("task"))
                and text(r.get("metric")) == text(t.get("metric"))
            ):
                v, rv = num(t.get("value")), num(r.get("value"))
                if v is None or rv is None:
                    return None
                scale = 100 if max(abs(v), abs(rv)) <= 1 else 1
                return (v - rv) * scale
        return None

    def _variant_quality(self, v: str) -> dict:
        """pass / fail / unknown for one variant, with its worst perplexity and accuracy deltas."""
        b = self.budget
        reasons, fails = [], []
        ppl = [
            self.ppl_delta_pct(q)
            for q in self.quality
            if text(q.get("variant")) == v and q.get("status", "ok") == "ok"
        ]
        ppl = [x for x in ppl if x is not None]
        acc = [
            self.task_delta_points(t)
            for t in self.tasks
            if text(t.get("variant")) == v and t.get("status", "ok") == "ok"
        ]
        acc = [x for x in acc if x is not None]
        worst_ppl = max(ppl) if ppl else None
        worst_acc = min(acc) if acc else None
        if worst_ppl is not None and worst_ppl > b.max_ppl_increase_pct:
            fails.append(f"perplexity +{worst_ppl:.1f}% > {b.max_ppl_increase_pct:g}% allowed")
        if worst_acc is not None and -worst_acc > b.max_accuracy_drop_points:
            fails.append(
                f"accuracy {worst_acc:+.1f} points, more than the {b.max_accuracy_drop_points:g} allowed"
            )
        qs = [q for q in self.quality if text(q.get("variant")) == v]
        kl = [num(q.get("kl_mean")) for q in qs if num(q.get("kl_mean")) is not None]
        top1 = [num(q.get("top1")) for q in qs if num(q.get("top1")) is not None]
        if fails:
            verdict = "fail"
            reasons = fails
        elif v == self.reference:
            verdict = "pass"
            reasons = ["the reference variant"]
        elif ppl or acc:
            verdict = "pass"
            if not ppl:
                reasons.append("perplexity not measured")
            if not acc:
                reasons.append("task accuracy not measured")
        else:
            verdict = "unknown"
            reasons = ["quality not measured for this variant"]
        return {
            "verdict": verdict,
            "reasons": reasons,
            "ppl_delta_pct": worst_ppl,
            "acc_delta_points": worst_acc,
            "kl_mean": max(kl) if kl else None,
            "top1": min(top1) if top1 else None,
        }

    def _not_lossless(self) -> dict:
        """(target, draft) -> reasons its speculative output differs from the target's own."""
        out = defaultdict(list)
        for c in self.spec:
            if c.get("mode") == "greedy" and c.get("lossless") is False:
                ids = as_list(c.get("lossless_mismatches"))
                what = f"greedy output differs from target-only at γ={text(c.get('gamma'))}"
                if self.multi_suite():
                    what += f" on suite {text(c.get('suite'))}"
                if ids:
                    what += f" ({len(ids)} prompt(s): {', '.join(text(i) for i in ids[:5])})"
                out[(text(c.get("target")), text(c.get("draft")))].append(what)
        for t in self.task_lossless:
            if t.get("equal") is False:
                out[(text(t.get("target")), text(t.get("draft")))].append(
                    f"task {text(t.get('task'))}: accuracy {fmt(t.get('accuracy_plain'), 3)} plain "
                    f"vs {fmt(t.get('accuracy_speculative'), 3)} speculative"
                )
            elif t.get("outputs_identical") is False:
                docs = as_list(t.get("mismatched_docs"))
                out[(text(t.get("target")), text(t.get("draft")))].append(
                    f"task {text(t.get('task'))}: generated answers differ"
                    + (f" on {len(docs)} document(s)" if docs else "")
                )
        return dict(out)

    # -- pairings (speculative cells aggregated over suites)

    def pairings(self) -> list[dict]:
        groups = defaultdict(list)
        for c in self.spec:
            key = (text(c.get("target")), text(c.get("draft")), c.get("gamma"), text(c.get("mode")))
            groups[key].append(c)
        out = []
        for (target, draft, gamma, mode), cs in groups.items():
            speedup = geomean([num(c.get("speedup")) for c in cs])
            tok = sum(num(c.get("tokens")) or 0 for c in cs)
            sec = sum(num(c.get("seconds")) or 0 for c in cs)
            tps = tok / sec if tok and sec else geomean([num(c.get("tokens_per_s")) for c in cs])
            peaks = [num(c.get("peak_memory_bytes")) for c in cs]
            peaks = [p for p in peaks if p is not None]
            vq = self.vq.get(target) or self._variant_quality(target)
            reasons = []
            if vq["verdict"] == "fail":
                reasons.append("target quality outside the budget: " + "; ".join(vq["reasons"]))
            elif vq["verdict"] == "unknown":
                reasons.append("target quality not measured")
            if (target, draft) in self.not_lossless:
                reasons.append("output not lossless (see the warning above)")
            if speedup is None:
                reasons.append("no speedup measured (no target-only baseline)")
            out.append(
                {
                    "target": target,
                    "draft": draft,
                    "gamma": gamma,
                    "mode": mode,
                    "label": f"{target} + {draft} γ={gamma} {mode}",
                    "speedup": speedup,
                    "tokens_per_s": tps,
                    "weights": self.weights_total(cs[0]),
                    "peak": max(peaks) if peaks else None,
                    "peak_measure": cs[0].get("peak_memory_measure"),
                    "alpha": num(cs[0].get("alpha_measured")) if len(cs) == 1 else None,
                    "tau": num(cs[0].get("tau")) if len(cs) == 1 else None,
                    "quality": vq,
                    "lossless": (
                        False
                        if (target, draft) in self.not_lossless
                        else (True if all(c.get("lossless") is True for c in cs) else None)
                    ),
                    "eligible": not reasons,
                    "reasons": reasons,
                    "n_suites": len(cs),
                    "n_prompts": sum(int(num(c.get("n_prompts")) or 0) for c in cs),
                    "tokens": tok,
                    "steps": sum(int(num(c.get("steps")) or 0) for c in cs),
                }
            )
        out.sort(key=lambda p: -(p["speedup"] if p["speedup"] is not None else -1e9))
        return out

    # -- sample-size captions

    def caption(self, cells: list[dict]) -> str:
        if not cells:
            return f"no measured cells; {self.hardware_label}"

        def span(field):
            vals = [int(num(c.get(field))) for c in cells if num(c.get(field)) is not None]
            if not vals:
                return None
            lo, hi = min(vals), max(vals)
            return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"

        parts = [f"{len(cells)} cell{'s' if len(cells) != 1 else ''}"]
        for field, what in (
            ("n_prompts", "prompts"),
            ("tokens", "generated tokens"),
            ("steps", "target steps"),
        ):
            s = span(field)
            if s:
                parts.append(f"{s} {what} per cell")
        return "; ".join(parts) + f"; measured on {self.hardware_label}"


# ----------------------------------------------------------------------------- sections


def _verdict(run: Run) -> dict:
    b = run.budget
    pairs = run.pairings()
    eligible = [p for p in pairs if p["eligible"]]
    rec = eligible[0] if eligible else None
    fastest = pairs[0] if pairs and pairs[0]["speedup"] is not None else None
    per_mode = []
    for m in run.modes:
        el = [p for p in eligible if p["mode"] == m]
        per_mode.append({"mode": m, "best": el[0] if el else None})
    # highest absolute throughput within the budget, the target alone included
    options = [
        {"label": p["label"], "tokens_per_s": p["tokens_per_s"], "weights": p["weights"]}
        for p in eligible
    ]
    for c in run.ok:
        if (
            c.get("kind") == "target_only"
            and run.vq.get(text(c.get("target")), {}).get("verdict") == "pass"
        ):
            options.append(
                {
                    "label": run.label(c),
                    "tokens_per_s": num(c.get("tokens_per_s")),
                    "weights": run.weights_total(c),
                }
            )
    options = [o for o in options if o["tokens_per_s"] is not None]
    throughput = max(options, key=lambda o: o["tokens_per_s"]) if options else None

    proxy = []
    if run.is_cpu:
        proxy.append(
            "Timings were measured on CPU and are not representative of GPU serving: "
            "treat speeds and speedups as a proxy; acceptance rates and quality carry over better."
        )
    ref_w = run.target_weights(run.reference) if run.reference else None
    if ref_w is not None and ref_w < SMALL_MODEL_BYTES:
        proxy.append(
            f"The target is a small model ({fmt_bytes(ref_w)} of weights at the reference "
            "precision): results are a proxy for the large models speculative decoding is used with."
        )
    notes = sorted({text(v.get("model_note")) for v in run.variants if v.get("model_note")})
    status = text(run.meta.get("status")) or "unknown"
    non_lossless = [
        {"target": t, "draft": d, "reasons": r} for (t, d), r in run.not_lossless.items()
    ]
    hf_not_lossless = [
        run.label(c)
        for c in run.ok
        if c.get("kind") == "hf_assisted" and c.get("lossless") is False
    ]
    return {
        "budget": b,
        "recommended": rec,
        "fastest": fastest,
        "same": rec is not None and fastest is not None and rec["label"] == fastest["label"],
        "per_mode": per_mode,
        "throughput": throughput,
        "pairings": pairs,
        "proxy": proxy,
        "provenance": notes,
        "status": status,
        "non_lossless": non_lossless,
        "hf_not_lossless": hf_not_lossless,
        "n_failed": sum(1 for c in run.cells if c.get("status") not in ("ok",)),
        "caption": run.caption(run.spec),
        "slower": rec is not None and rec["speedup"] is not None and rec["speedup"] < 1,
    }


def _matrix(run: Run) -> dict:
    groups = []
    keys = []
    for c in run.ok:
        if c.get("kind") in ("speculative", "hf_assisted"):
            k = (text(c.get("suite")), text(c.get("mode")), c.get("gamma"))
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (_pos(run.suites, k[0]), _pos(run.modes, k[1]), num(k[2]) or 0))
    for suite, mode, gamma in keys:
        spec, hf = {}, {}
        for c in run.ok:
            if (text(c.get("suite")), text(c.get("mode")), c.get("gamma")) != (suite, mode, gamma):
                continue
            cell = (text(c.get("target")), text(c.get("draft")))
            (spec if c.get("kind") == "speculative" else hf)[cell] = c
        rows = [t for t in run.targets if any(k[0] == t for k in list(spec) + list(hf))]
        cols = [d for d in run.drafts if any(k[1] == d for k in list(spec) + list(hf))]
        if not rows or not cols:
            continue
        table = []
        for t in rows:
            line = []
            for d in cols:
                s, h = spec.get((t, d)), hf.get((t, d))
                failed = next(
                    (
                        c
                        for c in run.cells
                        if c.get("kind") == "speculative"
                        and c.get("status") != "ok"
                        and (text(c.get("suite")), text(c.get("mode")), c.get("gamma"))
                        == (suite, mode, gamma)
                        and (text(c.get("target")), text(c.get("draft"))) == (t, d)
                    ),
                    None,
                )
                line.append({"spec": s, "hf": h, "failed": failed})
            table.append({"target": t, "cells": line})
        figure = None
        sc = list(spec.values())
        if sc:

            def grid(field, _spec=spec, _rows=rows, _cols=cols):
                return [[num((_spec.get((t, d)) or {}).get(field)) for d in _cols] for t in _rows]

            sp = grid("speedup")
            sp = [[v if v is not None and v > 0 else None for v in r] for r in sp]
            top = max([abs(math.log(v)) for r in sp for v in r if v] + [math.log(1.5)])
            alpha_notes = [
                [
                    (
                        f"pred {fmt((spec.get((t, d)) or {}).get('alpha_predicted'))}"
                        if num((spec.get((t, d)) or {}).get("alpha_predicted")) is not None
                        else None
                    )
                    for d in cols
                ]
                for t in rows
            ]
            panels = [
                {
                    "title": "measured speedup (×)",
                    "values": [[math.log(v) if v else None for v in r] for r in sp],
                    "fmt": lambda v: f"{math.exp(v):.2f}×",
                    "cmap": "RdBu",
                    "vmin": -top,
                    "vmax": top,
                },
                {
                    "title": "acceptance rate",
                    "values": grid("acceptance_rate"),
                    "fmt": lambda v: f"{v:.2f}",
                    "cmap": "viridis",
                    "vmin": 0,
                    "vmax": 1,
                },
                {
                    "title": f"τ (tokens/step, max {gamma + 1 if num(gamma) is not None else '?'})",
                    "values": grid("tau"),
                    "fmt": lambda v: f"{v:.2f}",
                    "cmap": "viridis",
                    "vmin": 1,
                    "vmax": (num(gamma) or 1) + 1,
                },
                {
                    "title": "α measured (α predicted)",
                    "values": grid("alpha_measured"),
                    "fmt": lambda v: f"{v:.2f}",
                    "cmap": "viridis",
                    "vmin": 0,
                    "vmax": 1,
                    "notes": alpha_notes,
                },
            ]
            try:
                figure = plots.heatmaps(
                    panels, rows, cols, f"suite {suite}, {mode}, γ={gamma}: target × draft"
                )
            except Exception as err:  # noqa: BLE001 - the tables still carry the numbers
                log.warning("matrix figure failed: %s", err)
        groups.append(
            {
                "suite": suite,
                "mode": mode,
                "gamma": gamma,
                "cols": cols,
                "rows": table,
                "figure": figure,
                "caption": run.caption(sc),
                "n_hf": len(hf),
            }
        )
    return {"groups": groups}


def _quality(run: Run) -> dict:
    b = run.budget
    order = run._all_variants()

    def vkey(r):
        v = text(r.get("variant"))
        s = text(r.get("suite"))
        return (_pos(run.suites, s), _pos(order, v))

    rows = []
    for q in sorted(run.quality, key=vkey):
        d = run.ppl_delta_pct(q)
        ok = q.get("status", "ok") == "ok"
        rows.append(
            {
                "r": q,
                "ok": ok,
                "delta": d,
                "pass": None if d is None or not ok else d <= b.max_ppl_increase_pct,
                "reference": text(q.get("variant")) == run.reference,
                "tokens": first(q, "tokens", "positions"),
                "kl_se": first(q, "kl_mean_se", "kl_se"),
                "rms_dp": first(q, "rms_dp", "dp_rms"),
                "weights": first(q, "weights_bytes")
                or run.variant_weights.get(("any", text(q.get("variant")))),
            }
        )
    tasks = []
    for t in sorted(run.tasks, key=lambda r: (*vkey(r), text(r.get("task")))):
        d = run.task_delta_points(t)
        ok = t.get("status", "ok") == "ok"
        v, se = num(t.get("value")), num(t.get("stderr"))
        scale = 100 if v is not None and abs(v) <= 1 else 1
        tasks.append(
            {
                "r": t,
                "ok": ok,
                "value_pts": v * scale if v is not None else None,
                "se_pts": se * scale if se is not None else None,
                "delta": d,
                "pass": None if d is None or not ok else -d <= b.max_accuracy_drop_points,
                "reference": text(t.get("variant")) == run.reference,
            }
        )
    verdicts = [{"variant": v, **run.vq[v]} for v in order if v in run.vq]
    variants = [{"r": v, "weights": num(v.get("weights_bytes"))} for v in run.variants]
    notes = {text(v.get("model_note")) for v in run.variants}
    common_note = notes.pop() if len(notes) == 1 else None
    return {
        "rows": rows,
        "tasks": tasks,
        "task_lossless": run.task_lossless,
        "verdicts": verdicts,
        "variants": variants,
        "common_note": common_note,
        "reference": run.reference,
        "budget": b,
        "positions": sorted({int(num(r["tokens"])) for r in rows if num(r["tokens"]) is not None}),
    }


def _pareto_front(points: list[dict]) -> None:
    """Mark points no other point beats on both memory (lower) and tokens/s (higher)."""
    for p in points:
        p["front"] = not any(
            (o["x"] <= p["x"] and o["y"] >= p["y"]) and (o["x"] < p["x"] or o["y"] > p["y"])
            for o in points
            if o is not p
        )


def _pareto(run: Run) -> dict:
    panels, fronts = [], []
    for mode in run.modes:
        for measure, xlabel, getter in (
            ("weights", "weights of target + draft (MiB)", run.weights_total),
            (
                "peak",
                "peak memory during the cell (MiB)",
                lambda c: num(c.get("peak_memory_bytes")),
            ),
        ):
            pts = []
            for c in run.ok:
                if text(c.get("mode")) != mode:
                    continue
                x, y = getter(c), num(c.get("tokens_per_s"))
                if x is None or y is None:
                    continue
                vq = run.vq.get(text(c.get("target")), {})
                pts.append(
                    {
                        "x": x / 1024**2,
                        "y": y,
                        "c": vq.get("ppl_delta_pct"),
                        "kind": c.get("kind"),
                        "cell": c,
                        "label": run.label(c),
                    }
                )
            if not pts:
                continue
            _pareto_front(pts)
            panels.append(
                {
                    "title": f"{mode}: tokens/s vs {measure}",
                    "xlabel": xlabel,
                    "points": pts,
                }
            )
            fronts.append(
                {
                    "mode": mode,
                    "measure": measure,
                    "points": sorted((p for p in pts if p["front"]), key=lambda p: p["x"]),
                }
            )
    figure = None
    if panels:
        try:
            figure = plots.pareto(
                panels,
                "target perplexity increase (%)",
                vmin=0.0,
                vmax=2 * run.budget.max_ppl_increase_pct,
            )
        except Exception as err:  # noqa: BLE001
            log.warning("pareto figure failed: %s", err)
    return {
        "figure": figure,
        "fronts": fronts,
        "caption": run.caption(run.ok),
        "measure": next(
            (c.get("peak_memory_measure") for c in run.ok if c.get("peak_memory_measure")), None
        ),
    }


def _screen_for(run: Run, c: dict) -> dict | None:
    for s in run.screens:
        if (
            text(s.get("suite")) == text(c.get("suite"))
            and text(s.get("target")) == text(c.get("target"))
            and text(s.get("draft")) == text(c.get("draft"))
        ):
            return s
    return None


def _corpus_prediction(run: Run, c: dict) -> dict:
    s = _screen_for(run, c)
    if s is None:
        return {"alpha": None, "se": None, "positions": None, "tau": None, "rate": None}
    mode = "greedy" if c.get("mode") == "greedy" else "sample"
    pred = s.get("predicted") if isinstance(s.get("predicted"), dict) else {}
    at = pred.get(text(c.get("gamma")))
    at = at if isinstance(at, dict) else {}
    suffix = "_sample" if mode == "sample" else ""  # "tau" is the greedy prediction
    return {
        "alpha": num(s.get(f"alpha_predicted_{mode}")),
        "se": num(s.get(f"alpha_predicted_{mode}_se")),
        "positions": s.get("positions"),
        "tau": num(first(at, f"tau{suffix}", "tau")),
        "rate": num(first(at, f"acceptance_rate{suffix}", "acceptance_rate")),
    }


def _acceptance(run: Run) -> dict:
    groups = []
    keys = []
    for c in run.spec:
        k = (text(c.get("suite")), text(c.get("mode")), c.get("gamma"))
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (_pos(run.suites, k[0]), _pos(run.modes, k[1]), num(k[2]) or 0))
    for suite, mode, gamma in keys:
        cs = [
            c
            for c in run.spec
            if (text(c.get("suite")), text(c.get("mode")), c.get("gamma")) == (suite, mode, gamma)
        ]
        g = max(0, min(int(num(gamma) or 0), 64))  # a nonsense gamma must not blow up the tables
        rows = []
        for c in cs:
            pa = (
                c.get("position_acceptance")
                if isinstance(c.get("position_acceptance"), list)
                else []
            )
            pt = c.get("position_tested") if isinstance(c.get("position_tested"), list) else []
            hist = (
                c.get("accepted_histogram") if isinstance(c.get("accepted_histogram"), list) else []
            )
            total = sum(num(h) or 0 for h in hist)
            rows.append(
                {
                    "c": c,
                    "label": f"{text(c.get('target'))} + {text(c.get('draft'))}",
                    "positions": [
                        {
                            "p": num(pa[i]) if i < len(pa) else None,
                            "n": pt[i] if i < len(pt) else None,
                        }
                        for i in range(g)
                    ],
                    "hist": [
                        {
                            "n": hist[i] if i < len(hist) else None,
                            "f": (num(hist[i]) or 0) / total if i < len(hist) and total else None,
                        }
                        for i in range(g + 1)
                    ],
                    "hist_total": total,
                }
            )
        figure = None
        if rows and g > 0:
            try:
                figure = plots.grouped_bars(
                    [
                        {
                            "title": "conditional acceptance per draft position",
                            "xlabel": "draft position (1 = first drafted token)",
                            "ylabel": "P(accept | reached)",
                            "categories": [str(i + 1) for i in range(g)],
                            "series": [
                                (r["label"], [p["p"] for p in r["positions"]]) for r in rows
                            ],
                            "ann": [
                                [
                                    f"n={p['n']}" if p["n"] is not None else ""
                                    for p in r["positions"]
                                ]
                                for r in rows
                            ],
                            "ylim": (0, 1.12),
                            "legend": True,
                        },
                        {
                            "title": "accepted drafts per step (share of steps)",
                            "xlabel": "accepted drafts in the step",
                            "ylabel": "share of steps",
                            "categories": [str(i) for i in range(g + 1)],
                            "series": [(r["label"], [h["f"] for h in r["hist"]]) for r in rows],
                            "ylim": (0, 1.05),
                            "legend": True,
                        },
                    ],
                    f"suite {suite}, {mode}, γ={gamma}",
                )
            except Exception as err:  # noqa: BLE001
                log.warning("acceptance figure failed: %s", err)
        groups.append(
            {
                "suite": suite,
                "mode": mode,
                "gamma": gamma,
                "g": g,
                "rows": rows,
                "figure": figure,
                "caption": run.caption(cs),
            }
        )

    # predicted (corpus) vs predicted (on policy) vs measured alpha
    alphas = []
    for c in run.spec:
        alphas.append(
            {
                "c": c,
                "label": run.label(c),
                "corpus": _corpus_prediction(run, c),
                "on_policy": num(c.get("alpha_predicted")),
                "on_policy_n": c.get("alpha_predicted_positions"),
                "on_policy_what": c.get("alpha_predicted_on"),
                "measured": num(c.get("alpha_measured")),
                "tested": c.get("tested"),
            }
        )
    alpha_figure = None
    if alphas:
        try:
            alpha_figure = plots.grouped_bars(
                [
                    {
                        "title": "α: predicted on corpus, predicted on policy, measured",
                        "ylabel": "α (per-token acceptance)",
                        "categories": [a["label"] for a in alphas],
                        "series": [
                            ("predicted (corpus)", [a["corpus"]["alpha"] for a in alphas]),
                            ("predicted (on policy)", [a["on_policy"] for a in alphas]),
                            ("measured", [a["measured"] for a in alphas]),
                        ],
                        "ylim": (0, 1.05),
                    }
                ]
            )
        except Exception as err:  # noqa: BLE001
            log.warning("alpha figure failed: %s", err)

    # gamma sweep per (suite, mode, target, draft) when several gammas were measured
    sweeps = []
    for suite in run.suites:
        for mode in run.modes:
            cs = [
                c
                for c in run.spec
                if text(c.get("suite")) == suite
                and text(c.get("mode")) == mode
                and num(c.get("gamma")) is not None
            ]
            if len({c.get("gamma") for c in cs}) < 2:
                continue
            pairs = _order([f"{text(c.get('target'))} + {text(c.get('draft'))}" for c in cs], [])
            series_tau, series_sp, table = [], [], []
            gammas = sorted({int(num(c["gamma"])) for c in cs})
            for i, p in enumerate(pairs):
                pc = sorted(
                    (c for c in cs if f"{text(c.get('target'))} + {text(c.get('draft'))}" == p),
                    key=lambda c: num(c["gamma"]),
                )
                xs = [num(c["gamma"]) for c in pc]
                corpus = [_corpus_prediction(run, c)["tau"] for c in pc]
                measured = {"colour": i, "group": p, "kind": "measured"}
                on_policy = {
                    "colour": i,
                    "group": p,
                    "kind": "predicted (on policy)",
                    "ls": "--",
                    "marker": "x",
                }
                on_corpus = {
                    "colour": i,
                    "group": p,
                    "kind": "predicted (corpus)",
                    "ls": ":",
                    "marker": "+",
                }
                series_tau.append((p, xs, [num(c.get("tau")) for c in pc], measured))
                series_tau.append((p, xs, [num(c.get("tau_predicted")) for c in pc], on_policy))
                if any(v is not None for v in corpus):
                    series_tau.append((p, xs, corpus, on_corpus))
                series_sp.append((p, xs, [num(c.get("speedup")) for c in pc], measured))
                series_sp.append((p, xs, [num(c.get("speedup_predicted")) for c in pc], on_policy))
                for c, cp in zip(pc, corpus, strict=True):
                    table.append({"pair": p, "c": c, "corpus_tau": cp})
            figure = None
            try:
                figure = plots.lines(
                    [
                        {
                            "title": "τ vs γ",
                            "xlabel": "γ (drafts per step)",
                            "ylabel": "τ (tokens per target step)",
                            "series": series_tau,
                            "xticks": gammas,
                        },
                        {
                            "title": "speedup vs γ",
                            "xlabel": "γ (drafts per step)",
                            "ylabel": "speedup (×)",
                            "series": series_sp,
                            "xticks": gammas,
                            "hline": 1.0,
                        },
                    ],
                    f"suite {suite}, {mode}: γ sweep",
                )
            except Exception as err:  # noqa: BLE001
                log.warning("gamma sweep figure failed: %s", err)
            sweeps.append(
                {
                    "suite": suite,
                    "mode": mode,
                    "figure": figure,
                    "table": table,
                    "caption": run.caption(cs),
                }
            )
    return {
        "groups": groups,
        "alphas": alphas,
        "alpha_figure": alpha_figure,
        "alpha_caption": run.caption(run.spec),
        "sweeps": sweeps,
        "screens": run.screens,
    }


def _bucket(n: int) -> int:
    for i, edge in enumerate(LENGTH_BUCKETS):
        if n <= edge:
            return i
    return len(LENGTH_BUCKETS)


def _bucket_label(i: int) -> str:
    lo = 1 if i == 0 else LENGTH_BUCKETS[i - 1] + 1
    return f"{lo}–{LENGTH_BUCKETS[i]}" if i < len(LENGTH_BUCKETS) else f">{LENGTH_BUCKETS[-1]}"


def _prompt_times(c: dict) -> dict:
    """prompt id -> (tokens, seconds, category) from a cell's outputs."""
    out = {}
    for o in as_list(c.get("outputs")):
        if not isinstance(o, dict):
            continue
        n, tps = n_tokens(o), num(o.get("tokens_per_s"))
        if n and tps:
            out[text(o.get("id"))] = (n, n / tps, text(o.get("category")) or "(none)")
    return out


def _latency(run: Run) -> dict:
    rows = [c for c in run.ok if c.get("kind") in ("target_only", "speculative")]
    figures = []
    for suite in run.suites:
        for mode in run.modes:
            cs = [
                c
                for c in rows
                if text(c.get("suite")) == suite
                and text(c.get("mode")) == mode
                and c.get("kind") != "hf_assisted"
            ]
            if not cs:
                continue
            labels = [run.label(c, suite=False) for c in cs]
            try:
                figures.append(
                    {
                        "title": f"suite {suite}, {mode}",
                        "figure": plots.hbars(
                            [
                                {
                                    "title": "time to first token",
                                    "xlabel": "seconds",
                                    "labels": labels,
                                    "values": [num(c.get("ttft_s_p50")) for c in cs],
                                    "value_label": "p50",
                                },
                                {
                                    "title": "per-token latency",
                                    "xlabel": "seconds per token",
                                    "labels": labels,
                                    "values": [num(c.get("token_latency_s_p50")) for c in cs],
                                    "upper": [num(c.get("token_latency_s_p95")) for c in cs],
                                    "value_label": "p50",
                                    "upper_label": "p95",
                                },
                            ],
                            f"suite {suite}, {mode}: latency",
                        ),
                        "caption": run.caption(cs),
                    }
                )
            except Exception as err:  # noqa: BLE001
                log.warning("latency figure failed: %s", err)

    # speedup by output-length bucket: per prompt, speculative vs target-only on the same prompt
    used = set()
    brow = []
    for c in run.spec:
        base = run.baseline.get((text(c.get("suite")), text(c.get("target")), text(c.get("mode"))))
        if base is None:
            continue
        mine, theirs = _prompt_times(c), _prompt_times(base)
        acc = defaultdict(lambda: [0, 0.0, 0, 0.0, 0])
        for pid, (n, s, _) in mine.items():
            if pid not in theirs:
                continue
            bn, bs, _ = theirs[pid]
            a = acc[_bucket(n)]
            a[0] += n
            a[1] += s
            a[2] += bn
            a[3] += bs
            a[4] += 1
        if not acc:
            continue
        cells = {}
        for i, (n, s, bn, bs, k) in acc.items():
            used.add(i)
            cells[i] = {"speedup": (n / s) / (bn / bs) if s and bs and bn else None, "n": k}
        brow.append({"label": run.label(c), "cells": cells})
    buckets = sorted(used)
    bfigure = None
    if brow and len(buckets) > 1:
        try:
            bfigure = plots.lines(
                [
                    {
                        "title": "speedup by output length",
                        "xlabel": "output length bucket (tokens)",
                        "ylabel": "speedup (×)",
                        "series": [
                            (
                                r["label"],
                                list(range(len(buckets))),
                                [(r["cells"].get(b) or {}).get("speedup") for b in buckets],
                                {},
                            )
                            for r in brow
                        ],
                        "xticks": list(range(len(buckets))),
                        "xticklabels": [_bucket_label(b) for b in buckets],
                        "hline": 1.0,
                    }
                ]
            )
        except Exception as err:  # noqa: BLE001
            log.warning("bucket figure failed: %s", err)
    return {
        "rows": [{"c": c, "label": run.label(c)} for c in rows],
        "figures": figures,
        "caption": run.caption(rows),
        "compile": _compile(run, rows),
        "buckets": [{"i": b, "label": _bucket_label(b)} for b in buckets],
        "bucket_rows": brow,
        "bucket_figure": bfigure,
    }


def _compile_setting(config: dict) -> str | None:
    """The configured torch.compile choice in words; None when the config predates the key."""
    if "compile" not in config:
        return None
    v = config["compile"]
    if v is None:
        return "auto (on for CUDA, off for CPU)"
    return "on" if v is True else "off" if v is False else text(v)


def _compile(run: Run, cells: list[dict]) -> dict:
    """Whether torch.compile ran per cell and the warm-up seconds it cost: latency never counts
    them, so the report must say where that time went."""
    on = [c for c in cells if c.get("compile") is True]
    off = [c for c in cells if c.get("compile") is False]
    secs = [num(c.get("compile_s")) for c in on]
    secs = [s for s in secs if s is not None]
    unknown = len(cells) - len(on) - len(off)
    parts = []
    for n, what in ((len(on), "on"), (len(off), "off"), (unknown, "not recorded")):
        if n:
            parts.append(
                f"{what} for {'all ' if n == len(cells) and n > 1 else ''}{n} cell" + "s" * (n != 1)
            )
    return {
        "recorded": bool(on or off),
        "any_on": bool(on),
        "state": ", ".join(parts),
        "setting": _compile_setting(run.config),
        "total_s": sum(secs) if secs else None,
        "max_s": max(secs) if secs else None,
        "timed": len(secs),
    }


def _bandwidth(run: Run) -> dict | None:
    """run.json's copy-bandwidth measurement, or None for runs that did not measure it."""
    bw = run.meta.get("memory_bandwidth")
    if not isinstance(bw, dict) or num(bw.get("copy_gbps")) is None:
        return None
    device = text(bw.get("device")).lower()
    method = text(bw.get("method")).strip()
    if method and method[-1] not in ".!?":
        method += "."  # shown as a sentence
    return {
        "gbps": num(bw["copy_gbps"]),
        "buffer_bytes": num(bw.get("buffer_bytes")),
        "samples": num(bw.get("samples")),
        "device": device or None,
        "method": method or None,
    }


def _roofline_row(c: dict, copy_gbps: float | None) -> dict | None:
    """One forward's achieved weight-read bandwidth; derived numbers fill fields a writer left
    out, but the record's own figures win (they are what the engine measured)."""
    r = c.get("roofline")
    if not isinstance(r, dict):
        return None
    nbytes, step = num(r.get("bytes_per_step")), num(r.get("step_s_p50"))
    achieved = num(r.get("achieved_gbps"))
    if achieved is None and nbytes is not None and step:
        achieved = nbytes / step / 1e9
    bandwidth = num(r.get("bandwidth_gbps"))
    if bandwidth is None:
        bandwidth = copy_gbps
    fraction = num(r.get("fraction"))
    if fraction is None and achieved is not None and bandwidth:
        fraction = achieved / bandwidth
    step_kind = text(r.get("kind")) or ("decode" if c.get("kind") == "target_only" else "verify")
    verify = step_kind == "verify"
    return {
        "c": c,
        "suite": text(c.get("suite")),
        "target": text(c.get("target")),
        "step": step_kind,
        "draft": text(c.get("draft")) if verify else None,
        "gamma": c.get("gamma") if verify else None,
        "mode": text(c.get("mode")),
        "bytes": nbytes,
        "step_s": step,
        "samples": r.get("step_samples"),
        "achieved": achieved,
        "bandwidth": bandwidth,
        "fraction": fraction,
    }


def _roofline(run: Run) -> dict:
    """Achieved weight-read bandwidth of decode and verify forwards against the measured copy
    bandwidth: how close each precision gets to the memory bound that speculation exploits."""
    bw = _bandwidth(run)
    copy_gbps = bw["gbps"] if bw else None
    cells = [c for c in run.ok if c.get("kind") in ("target_only", "speculative")]
    rows = [r for r in (_roofline_row(c, copy_gbps) for c in cells) if r is not None]
    decode = [r for r in rows if r["step"] != "verify"]
    verify = [r for r in rows if r["step"] == "verify"]
    omitted, shown_mode = 0, None
    if len(verify) > MAX_VERIFY_ROWS:
        # the (γ+1)-token forward is the same computation in every mode: show one mode's sweep
        modes = [m for m in run.modes if any(r["mode"] == m for r in verify)]
        shown_mode = "greedy" if "greedy" in modes else modes[0]
        omitted = sum(1 for r in verify if r["mode"] != shown_mode)
        verify = [r for r in verify if r["mode"] == shown_mode]
    rows = sorted(
        decode + verify,
        key=lambda r: (
            _pos(run.suites, r["suite"]),
            _pos(run.targets, r["target"]),
            r["step"] == "verify",
            _pos(run.modes, r["mode"]),
            num(r["gamma"]) or 0,
            _pos(run.drafts, r["draft"]),
        ),
    )
    multi = run.multi_suite()
    for r in rows:
        bits = [r["target"], r["step"]]
        if r["step"] == "verify":
            bits.append(f"{r['draft']} γ={text(r['gamma'])}")
        bits.append(r["mode"])
        r["label"] = (f"[{r['suite']}] " if multi else "") + " ".join(bits)
    bandwidths = sorted({round(r["bandwidth"], 1) for r in rows if r["bandwidth"] is not None})
    figure = None
    if rows and len(rows) <= MAX_ROOFLINE_FIGURE_ROWS:
        try:
            figure = plots.hbars(
                [
                    {
                        "title": "achieved GB/s per forward",
                        "xlabel": "GB/s (weights bytes ÷ median step time)",
                        "labels": [r["label"] for r in rows],
                        "values": [r["achieved"] for r in rows],
                        "value_label": "achieved",
                        "vline": copy_gbps,
                        "vline_label": "measured copy bandwidth",
                    }
                ]
            )
        except Exception as err:  # noqa: BLE001 - the table still carries the numbers
            log.warning("roofline figure failed: %s", err)
    device = bw["device"] if bw and bw["device"] else None
    return {
        "bandwidth": bw,
        "rows": rows,
        "figure": figure,
        "omitted": omitted,
        "shown_mode": shown_mode,
        "multi_suite": multi,
        "other_bandwidths": [
            b for b in bandwidths if copy_gbps is None or abs(b - copy_gbps) > 0.05
        ],
        "cpu": device == "cpu" if device else run.is_cpu,
        "caption": run.caption([r["c"] for r in rows]),
    }


def _breakdown(run: Run) -> dict:
    suites = []
    for s in run.suites:
        cs = [c for c in run.cells if text(c.get("suite")) == s]
        ok = [c for c in cs if c.get("status") == "ok"]
        spec = [
            c for c in ok if c.get("kind") == "speculative" and num(c.get("speedup")) is not None
        ]
        best = max(spec, key=lambda c: num(c["speedup"])) if spec else None
        cats = sorted(
            {
                text(o.get("category"))
                for c in ok
                for o in as_list(c.get("outputs"))
                if isinstance(o, dict)
            }
        )
        suites.append(
            {
                "suite": s,
                "prompts": max([int(num(c.get("n_prompts")) or 0) for c in ok] or [0]),
                "categories": cats,
                "ok": len(ok),
                "failed": sum(1 for c in cs if c.get("status") == "failed"),
                "unavailable": sum(1 for c in cs if c.get("status") == "unavailable"),
                "best": best,
                "best_label": run.label(best, suite=False) if best else None,
                "quality": [q for q in run.quality if text(q.get("suite")) == s],
            }
        )
    # per category: tokens/s of each cell, and speedup against target-only on the same prompts
    categories = sorted(
        {v[2] for c in run.ok if c.get("kind") != "hf_assisted" for v in _prompt_times(c).values()}
    )
    rows = []
    for c in run.ok:
        if c.get("kind") == "hf_assisted":
            continue
        mine = _prompt_times(c)
        if not mine:
            continue
        base = run.baseline.get((text(c.get("suite")), text(c.get("target")), text(c.get("mode"))))
        theirs = _prompt_times(base) if base is not None and base is not c else {}
        cells = {}
        for cat in categories:
            ids = [p for p, v in mine.items() if v[2] == cat]
            if not ids:
                continue
            n = sum(mine[p][0] for p in ids)
            s = sum(mine[p][1] for p in ids)
            both = [p for p in ids if p in theirs]
            sp = None
            if both:
                a = sum(mine[p][0] for p in both) / sum(mine[p][1] for p in both)
                b = sum(theirs[p][0] for p in both) / sum(theirs[p][1] for p in both)
                sp = a / b if b else None
            cells[cat] = {"tps": n / s if s else None, "speedup": sp, "n": len(ids), "tokens": n}
        rows.append({"label": run.label(c), "kind": c.get("kind"), "cells": cells})
    return {"suites": suites, "categories": categories, "rows": rows}


def _failures(run: Run) -> dict:
    variants = [v for v in run.variants if v.get("status", "ok") != "ok"]
    cells = [c for c in run.cells if c.get("status") != "ok"]
    other = [
        r
        for r in run.quality + run.tasks + run.task_lossless + run.screens
        if r.get("status", "ok") != "ok"
    ]
    status = text(run.meta.get("status")) or "unknown"
    missing = []
    if status != "complete":
        missing = _missing_cells(run)
    return {
        "variants": variants,
        "cells": cells,
        "other": other,
        "missing": missing,
        "status": status,
        "cells_failed": run.meta.get("cells_failed"),
        "notes": run.notes,
        "non_lossless": [
            {"target": t, "draft": d, "reasons": r} for (t, d), r in run.not_lossless.items()
        ],
    }


def _missing_cells(run: Run) -> list[dict]:
    """Generation cells the run's config plans (the runner's own plan) that have no record."""
    from dataclasses import asdict

    from qspec.config import ConfigError, parse_config, resolve_defaults
    from qspec.plan import plan

    try:
        cfg = parse_config(run.config, "run.json config")
        suites = [text(s) for s in (run.meta.get("suites") or cfg.suites)]
    except (ConfigError, TypeError, ValueError):
        return []
    have = {
        (
            c.get("kind"),
            text(c.get("suite")),
            text(c.get("target")),
            c.get("draft"),
            c.get("gamma"),
            text(c.get("mode")),
        )
        for c in run.cells
    }
    device = (
        run.meta.get("hardware", {}).get("device", "cpu")
        if isinstance(run.meta.get("hardware"), dict)
        else "cpu"
    )
    planned = [asdict(cell) for cell in plan(resolve_defaults(cfg, device), suites, device)]
    return [p for p in planned if tuple(p.values()) not in have]


def _outputs(run: Run) -> dict:
    groups = []
    for c in run.ok:
        outs = [o for o in as_list(c.get("outputs")) if isinstance(o, dict)]
        if not outs:
            continue
        mism = {text(i) for i in as_list(c.get("lossless_mismatches"))}
        shown = []
        for o in outs[:MAX_OUTPUT_PROMPTS]:
            t = text(o.get("text"))
            shown.append(
                {
                    "o": o,
                    "text": t[:MAX_OUTPUT_CHARS],
                    "cut": len(t) > MAX_OUTPUT_CHARS,
                    "n": n_tokens(o),
                    "mismatch": text(o.get("id")) in mism,
                }
            )
        groups.append(
            {"label": run.label(c, suite=True), "c": c, "shown": shown, "total": len(outs)}
        )
    return {"groups": groups}


def _metadata(run: Run) -> dict:
    m = run.meta
    hw = m.get("hardware") if isinstance(m.get("hardware"), dict) else {}
    versions = m.get("versions") if isinstance(m.get("versions"), dict) else {}
    return {
        "status": text(m.get("status")) or "unknown",
        "started": m.get("started"),
        "finished": m.get("finished"),
        "duration": _duration(m.get("started"), m.get("finished")),
        "seed": m.get("seed", run.config.get("seed")),
        "suites": run.suites,
        "hardware": hw,
        "hardware_label": run.hardware_label,
        "versions": versions,
        "config": json.dumps(run.config, indent=2, sort_keys=False, default=str)
        if run.config
        else None,
        "cells_failed": m.get("cells_failed"),
        "n_records": len(run.cells)
        + len(run.variants)
        + len(run.quality)
        + len(run.screens)
        + len(run.tasks)
        + len(run.task_lossless),
        "n_cells": len(run.cells),
        "reference": run.reference,
        "extra": {
            k: v
            for k, v in m.items()
            if k
            not in {
                "config",
                "versions",
                "hardware",
                "hardware_label",
                "seed",
                "suites",
                "status",
                "started",
                "finished",
                "cells_failed",
                "memory_bandwidth",  # shown in the roofline section
            }
        },
    }


SECTIONS = (
    ("verdict", "Verdict", _verdict),
    ("matrix", "Pairing matrix", _matrix),
    ("quality", "Quality vs reference", _quality),
    ("pareto", "Speed, memory and quality", _pareto),
    ("acceptance", "Acceptance", _acceptance),
    ("latency", "Latency", _latency),
    ("roofline", "Bandwidth roofline", _roofline),
    ("breakdown", "Per suite and category", _breakdown),
    ("definitions", "Definitions", None),
    ("metadata", "Run metadata", _metadata),
    ("failures", "Failures and gaps", _failures),
    ("outputs", "Generated text", _outputs),
)


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("qspec", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        f=fmt,
        pct=fmt_pct,
        signed=fmt_signed,
        x=fmt_speedup,
        bytes=fmt_bytes,
        secs=fmt_seconds,
        int=fmt_int,
        text=text,
        num=num,
    )
    return env


def build_context(run: Run) -> dict:
    ctx = {
        "title": f"qspec report: {run.dir.name}",
        "run_name": run.dir.name,
        "hardware_label": run.hardware_label,
        "is_cpu": run.is_cpu,
        "sections": [(sid, title) for sid, title, _ in SECTIONS],
        "errors": {},
        "generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "status": text(run.meta.get("status")) or "unknown",
        "reference": run.reference,
        "budget": run.budget,
        "max_outputs": MAX_OUTPUT_PROMPTS,
    }
    for sid, _, builder in SECTIONS:
        if builder is None:
            continue
        try:
            ctx[sid] = builder(run)
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the report
            log.exception("report section %s failed", sid)
            ctx[sid] = None
            ctx["errors"][sid] = f"{type(err).__name__}: {err}"
    return ctx


def write_report(run_dir: Path, budget: Budget | None = None) -> Path:
    """Render run_dir/index.html from run_dir/run.json and run_dir/results.jsonl; return its path."""
    run_dir = Path(run_dir)
    run = Run(run_dir, budget)
    html = _environment().get_template("report.html.j2").render(**build_context(run))
    out = run_dir / "index.html"
    tmp = out.with_name(".index.html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out


def summary_text(run_dir: Path, budget: Budget | None = None) -> str:
    """One paragraph for the terminal: recommendation, fastest pairing, warnings."""
    run = Run(Path(run_dir), budget)
    v = _verdict(run)
    b = run.budget
    parts = [
        f"qspec run {run.dir.name} ({v['status']}, {run.hardware_label}, reference {run.reference or '?'})."
    ]

    def describe(p):
        q = p["quality"]
        bits = [f"{fmt_speedup(p['speedup'])} speedup", f"{fmt(p['tokens_per_s'])} tok/s"]
        if p["weights"] is not None:
            bits.append(f"{fmt_bytes(p['weights'])} weights")
        if q.get("ppl_delta_pct") is not None:
            bits.append(f"perplexity {q['ppl_delta_pct']:+.1f}%")
        if q.get("acc_delta_points") is not None:
            bits.append(f"accuracy {q['acc_delta_points']:+.1f} pts")
        return (
            f"target {p['target']} + draft {p['draft']}, γ={p['gamma']}, {p['mode']} "
            f"({', '.join(bits)})"
        )

    budget_txt = f"perplexity +{b.max_ppl_increase_pct:g}% and accuracy -{b.max_accuracy_drop_points:g} points"
    if v["recommended"]:
        parts.append(f"Recommended within {budget_txt}: {describe(v['recommended'])}.")
        if v["slower"]:
            parts.append(
                "It is still slower than the target alone: on this machine, serve without a draft."
            )
    elif v["pairings"]:
        parts.append(f"No speculative pairing meets the budget ({budget_txt}).")
    else:
        parts.append("No speculative cell was measured successfully.")
    if v["fastest"] and not v["same"]:
        parts.append(f"Fastest overall: {describe(v['fastest'])}.")
    if v["non_lossless"]:
        which = ", ".join(f"{n['target']}+{n['draft']}" for n in v["non_lossless"])
        parts.append(f"WARNING: speculative output is not lossless for {which}.")
    if v["n_failed"]:
        parts.append(f"{v['n_failed']} cell(s) failed or were unavailable.")
    if v["status"] not in ("complete",):
        parts.append(f"The run is {v['status']}: results are incomplete.")
    if run.is_cpu:
        parts.append("Timings on CPU are not representative of GPU serving.")
    # names come from results files: keep terminal control sequences out of the output
    return "".join(ch if ch.isprintable() else " " for ch in " ".join(parts))

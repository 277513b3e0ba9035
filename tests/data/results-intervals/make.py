"""Writes results.jsonl and run.json of a hand-built run with the interval fields (run once;
the files are committed): `python tests/data/results-intervals/make.py`."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
DOCS = [f"d{i}" for i in range(20)]
REF_SCORES = {d: float(i % 2) for i, d in enumerate(DOCS)}  # 10 of 20 right


def inv(invariant: bool, diff: float, flips: int) -> dict:
    return {
        "batch_invariant": invariant,
        "batch_invariance": {
            "positions": 256,
            "k": 4,
            "max_abs_logit_diff": diff,
            "argmax_flips": flips,
            "argmax_flips_per_1000": 1000 * flips / 256,
            "batch_invariant": invariant,
            "method": "one token per forward vs 4 tokens per forward",
        },
    }


def cell(kind: str, target: str, mode: str = "greedy", **kw) -> dict:
    r = {
        "key": f"{kind}/{target}/{kw.get('draft')}/{mode}/{kw.get('draft_length', 'fixed')}",
        "kind": kind,
        "suite": "default",
        "target": target,
        "mode": mode,
        "status": "ok",
        "n_prompts": 20,
        "tokens": 1280,
        "hardware": "GPU: test",
        "reference": "fp32",
        "peak_memory_measure": "the cell's own: target + draft weights + the largest rise",
    }
    r.update(kw)
    if kind != "target_only":
        r.setdefault("gamma", 3)
    r["seconds"] = r["tokens"] / r["tokens_per_s"]
    return r


def spec(target: str, draft: str, tps: float, sp: float, ci: list[float], **kw) -> dict:
    base = {
        "draft": draft,
        "tokens_per_s": tps,
        "decode_tokens_per_s": tps * 1.1,
        "speedup": sp,
        "speedup_ci95": ci,
        "speedup_pairs": 20,
        "speedup_decode": sp * 1.05,
        "speedup_decode_ci95": [ci[0] * 1.05, ci[1] * 1.05],
        "speedup_decode_pairs": 20,
        "steps": 400,
        "drafted": 1200,
        "accepted": 720,
        "tested": 1000,
        "alpha_measured": 0.72,
        "alpha_measured_ci95": [0.692, 0.747],
        "acceptance_rate": 0.6,
        "acceptance_rate_ci95": [0.572, 0.627],
        "tau": 2.8,
        "tau_se": 0.05,
        "accepted_histogram": [100, 60, 80, 160],
        "short_full_accepts": 7,
        "position_acceptance": [0.75, 0.7, 0.66],
        "position_tested": [400, 300, 210],
        "position_acceptance_unconditional": [0.75, 0.525, 0.347],
        "per_prompt_acceptance_rate": {"p10": 0.41, "p50": 0.61, "p90": 0.83, "n": 20},
        "per_prompt_tau": {"p10": 2.1, "p50": 2.8, "p90": 3.6, "n": 20},
        "alpha_predicted": 0.70,
        "alpha_predicted_se": 0.01,
        "alpha_gap": 0.02,
        "alpha_agrees": True,
        "lossless": True,
        "peak_memory_bytes": 600 * 1024**2,
    }
    if kw.get("mode", "greedy") == "greedy":
        base.update(tau_replay=2.8, alpha_replay=0.72, replay_exact=True)
    base.update(kw)
    return cell("speculative", target, **base)


def records() -> list[dict]:
    recs = [
        {"key": "v/fp32", "kind": "variant", "model": "m", "precision": "fp32",
         "weights_bytes": 500 * 1024**2, **inv(True, 0.0, 0)},
        {"key": "v/int8", "kind": "variant", "model": "m", "precision": "int8",
         "weights_bytes": 200 * 1024**2, **inv(False, 0.31, 3)},
        {"key": "v/int8-t0", "kind": "variant", "model": "m", "precision": "int8-t0",
         "weights_bytes": 200 * 1024**2, **inv(True, 0.0, 0)},
        {"key": "v/nf4", "kind": "variant", "model": "m", "precision": "nf4",
         "weights_bytes": 160 * 1024**2, **inv(True, 0.0, 0)},
    ]  # fmt: skip
    quality = {
        "fp32": (1.0, [1.0, 1.0]),
        "int8": (1.01, [1.004, 1.016]),  # within the 5% budget
        "int8-t0": (1.04, [1.01, 1.07]),  # straddles 1.05: inconclusive
        "nf4": (1.20, [1.15, 1.25]),  # significantly above: failed
    }
    for v, (ratio, ci) in quality.items():
        recs.append(
            {"key": f"q/{v}", "kind": "quality", "suite": "default", "variant": v,
             "reference": "fp32", "positions": 4096, "ppl": 10 * ratio, "ppl_se": 0.1,
             "ppl_ratio": ratio, "ppl_ratio_ci95": ci, "ln_ppl_ratio_se": 0.003,
             "kl_mean": 0.01 * (ratio - 1) * 100, "top1": 1.0 if v == "fp32" else 0.93,
             "top1_ci95": [1.0, 1.0] if v == "fp32" else [0.922, 0.937]}
        )  # fmt: skip
    for v in quality:
        scores = dict(REF_SCORES)
        if v == "int8":
            scores["d1"] = 0.0  # one document of 20 lost: -5 points, not significant
        recs.append(
            {"key": f"t/{v}", "kind": "task", "suite": "default", "variant": v, "task": "mcq",
             "metric": "acc", "value": sum(scores.values()) / 20, "stderr": 0.11, "n": 20,
             "higher_is_better": True, "doc_scores": scores}
        )  # fmt: skip
    recs += [
        cell("target_only", "fp32", tokens_per_s=10.0, peak_memory_bytes=520 * 1024**2),
        cell("target_only", "int8", tokens_per_s=12.0, peak_memory_bytes=220 * 1024**2),
        cell("target_only", "nf4", tokens_per_s=20.0, peak_memory_bytes=180 * 1024**2),
        spec("fp32", "ngram", 11.0, 1.1, [0.9, 1.3], oracle_decode_tokens_per_s=16.0,
             oracle_speedup_decode=1.6, mean_drafted=3.0),
        spec("fp32", "ngram", 11.5, 1.15, [0.95, 1.35], draft_length="confidence",
             mean_drafted=2.1),
        spec("fp32", "skip-50%", 10.5, 1.05, [0.97, 1.12], draft_skip=[3, 5, 7, 9]),
        spec("int8", "ngram", 14.0, 1.17, [1.1, 1.25], lossless=False,
             lossless_mismatches=["p1", "p2"], target_batch_invariant=False,
             lossless_divergence=[
                 {"id": "p1", "position": 17, "top1_top2_margin": 0.12},
                 {"id": "p2", "position": 40, "top1_top2_margin": 2.5},
             ]),
        spec("nf4", "ngram", 30.0, 1.5, [1.2, 1.8]),
        cell("hf_assisted", "fp32", draft="ngram", tokens_per_s=9.2, speedup=0.92,
             qspec_over_hf=1.2, qspec_over_hf_ci95=[1.05, 1.37], qspec_over_hf_pairs=20,
             qspec_over_hf_decode=1.25, qspec_over_hf_decode_ci95=[1.1, 1.42],
             qspec_over_hf_decode_pairs=20),
    ]  # fmt: skip
    return recs


RUN = {
    "config": {
        "target": {"ref": "m", "precisions": ["fp32", "int8", "int8-t0", "nf4"]},
        "draft": {"ref": "m", "precisions": ["ngram", "skip-50%"]},
        "suites": ["default"],
    },
    "hardware": {"device": "cuda"},
    "hardware_label": "GPU: test",
    "status": "complete",
    "suites": ["default"],
}

if __name__ == "__main__":
    (HERE / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    (HERE / "run.json").write_text(json.dumps(RUN, indent=1) + "\n")

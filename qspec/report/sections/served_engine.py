"""Served engine: every pairing measured in vLLM per concurrency level. Speedup against vLLM's
target alone at the same level (paired by repeat), where each draft stops paying, tokens/s
and TPOT per level, acceptance from the engine's counters, and the engines side by side: the
acceptance vLLM counted against qspec's loop and qspec's prediction for the same pairing."""

from __future__ import annotations

from qspec.measure.concurrency import interval_note
from qspec.records import GenerationRecord, Kind, ServingRecord
from qspec.report import plots
from qspec.report.analysis import Run
from qspec.report.format import interval

MODES = ("greedy", "sample")


def name(r: ServingRecord) -> str:
    return f"{r.target} alone" if r.draft is None else f"{r.target} + {r.draft} (γ={r.gamma})"


def recommend(records: list[ServingRecord], mode: str) -> list[dict]:
    """Per level, what to serve: the highest total tokens/s among the targets alone and the
    pairings whose speedup interval over their own target alone lies above 1."""
    out = []
    levels = sorted({r.concurrency for r in records if r.mode == mode})
    for level in levels:
        here = [r for r in records if r.mode == mode and r.concurrency == level and r.ok]
        candidates = [
            r
            for r in here
            if r.output_tokens_per_s is not None
            and (r.draft is None or (interval(r.speedup_ci95) or (0, 0))[0] > 1)
        ]
        best = max(candidates, key=lambda r: r.output_tokens_per_s, default=None)
        out.append({"concurrency": level, "best": best, "measured": len(here)})
    return out


def stops_paying(records: list[ServingRecord], mode: str) -> list[dict]:
    """Per pairing: the levels where its speedup interval is above 1, and the first where not."""
    out = []
    for pairing in dict.fromkeys(name(r) for r in records if r.draft is not None):
        rows = sorted(
            (r for r in records if r.mode == mode and name(r) == pairing and r.ok),
            key=lambda r: r.concurrency,
        )
        pays = [r.concurrency for r in rows if (interval(r.speedup_ci95) or (0, 0))[0] > 1]
        stops = next((r.concurrency for r in rows if r.concurrency not in pays), None)
        out.append({"pairing": pairing, "pays_at": pays, "stops_at": stops, "levels": len(rows)})
    return out


def side_by_side(run: Run, records: list[ServingRecord]) -> list[dict]:
    """vLLM's acceptance rate next to qspec's measured and predicted one, same pairing and mode,
    at vLLM's lowest level; flagged where the intervals do not overlap."""
    cells = {
        (c.suite, c.target, c.draft, c.gamma, c.mode): c
        for c in run.spec
        if c.kind == Kind.SPECULATIVE and c.draft_length == "fixed"
    }
    rows = []
    lowest = {}
    for r in records:
        if r.ok and r.draft is not None and r.acceptance_rate is not None:
            k = (r.suite, r.target, r.draft, r.gamma, r.mode)
            if k not in lowest or r.concurrency < lowest[k].concurrency:
                lowest[k] = r
    for (suite, target, draft, gamma, mode), r in lowest.items():
        # the same target precision where qspec ran it, else qspec's reference target
        q: GenerationRecord | None = cells.get((suite, target, draft, gamma, mode))
        if q is None:
            q = cells.get((suite, run.reference, draft, gamma, mode))
        same = q is not None and q.target == target
        predicted, how = _predicted_for(r, q)
        rows.append(
            {
                "r": r,
                "q": q,
                "same_target": same,
                "flag": _disagreement(r, q),
                "predicted": predicted,
                "predicted_how": how,
            }
        )
    return rows


def _sampler_defect(r: ServingRecord) -> bool:
    from qspec.backends.vllm_probe import BROKEN_SAMPLER

    return bool(r.error) and r.error.startswith(BROKEN_SAMPLER[:60])


def _predicted_for(r: ServingRecord, q: GenerationRecord | None) -> tuple[float | None, str]:
    """qspec's predicted acceptance rate for vLLM's own draft sampling: a sampled draft
    model that vLLM draws greedily ("draft_sample_method": "greedy") is accepted with
    p(argmax q), not sum min(p, q)."""
    if q is None:
        return None, ""
    method = (r.speculative_config or {}).get("draft_sample_method")
    if r.mode == "sample" and method == "greedy":
        return q.acceptance_rate_predicted_greedy_draft, "p(argmax q): vLLM draws drafts greedily"
    return q.acceptance_rate_predicted, "as qspec's loop samples"


def _disagreement(r: ServingRecord, q: GenerationRecord | None) -> str | None:
    if q is None or q.acceptance_rate is None:
        return None
    mine, theirs = interval(r.acceptance_rate_ci95), interval(q.acceptance_rate_ci95)
    if mine and theirs and (mine[1] < theirs[0] or theirs[1] < mine[0]):
        return (
            f"vLLM accepts {r.acceptance_rate:.1%} (95% CI {mine[0]:.1%}–{mine[1]:.1%}, "
            f"n = {r.draft_tokens} drafts), qspec's loop {q.acceptance_rate:.1%} "
            f"(95% CI {theirs[0]:.1%}–{theirs[1]:.1%}, n = {q.drafted}): the intervals do not overlap"
        )
    return None


def _figure(records: list[ServingRecord], mode: str) -> str | None:
    pairings = list(dict.fromkeys(name(r) for r in records if r.mode == mode and r.ok))
    if not pairings:
        return None

    def series(field: str, which: list[str]):
        out = []
        for p in which:  # one colour per pairing in both panels
            rows = sorted(
                (r for r in records if r.mode == mode and r.ok and name(r) == p),
                key=lambda r: r.concurrency,
            )
            xs = [r.concurrency for r in rows]
            out.append((p, xs, [getattr(r, field) for r in rows], {"colour": pairings.index(p)}))
        return out

    levels = sorted({r.concurrency for r in records if r.mode == mode})

    drafted = [p for p in pairings if not p.endswith(" alone")]
    panels = [
        {
            "title": f"output tokens/s, {mode}",
            "xlabel": "concurrent requests",
            "ylabel": "tokens/s (all requests)",
            "series": series("output_tokens_per_s", pairings),
            "xticks": levels,
        }
    ]
    if drafted:
        panels.insert(
            0,
            {
                "title": f"speedup over the target alone, {mode}",
                "xlabel": "concurrent requests",
                "ylabel": "speedup (geometric mean of per-request ratios)",
                "series": series("speedup", drafted),
                "hline": 1.0,
                "xticks": levels,
            },
        )
    return plots.try_figure("serving", plots.lines, panels)


def build(run: Run) -> dict | None:
    records = run.serving
    if not records:
        return None
    ok = [r for r in records if r.ok]
    modes = [m for m in MODES if any(r.mode == m for r in records)]
    first = ok[0] if ok else records[0]
    return {
        "rows": sorted(
            records,
            key=lambda r: (MODES.index(r.mode), r.draft is not None, name(r), r.concurrency),
        ),
        "modes": [
            {
                "mode": m,
                "figure": _figure(records, m),
                "recommend": recommend(records, m),
                "stops": stops_paying(records, m),
            }
            for m in modes
        ],
        "side_by_side": side_by_side(run, records),
        # qspec's loop against vLLM, the target alone at one request, paired by repeat
        "loops": [r for r in records if r.ok and r.qspec_over_vllm is not None],
        "failed": [r for r in records if not r.ok],
        # which code each quantized target's served figures come from, as vLLM's log names it
        "kernels": {r.target: r.vllm_kernels for r in records if r.vllm_kernels},
        # vLLM's own sampler defect on this device, probed at the start (vllm_server.py)
        "sampler_defect": next(
            (r.error for r in records if r.status == "unavailable" and _sampler_defect(r)), None
        ),
        "engine": first.engine_version or first.engine,
        "hardware": first.hardware or run.hardware_label,
        "n_prompts": first.n_prompts,
        "repeats": first.repeats,
        "max_new_tokens": first.max_new_tokens,
        "server": first.server,
        # what stands behind every speedup interval: n = repeats, and how wide that leaves it
        "interval": next(
            (r.speedup_interval for r in ok if r.speedup_interval),
            interval_note(first.repeats) if first.repeats else "n = repeats",
        ),
        "launch": first.launch,
        "gpu_shares": [
            f"{name(r)} {r.gpu_memory_utilization:g}"
            for r in {name(r): r for r in ok if r.gpu_memory_utilization is not None}.values()
        ],
    }

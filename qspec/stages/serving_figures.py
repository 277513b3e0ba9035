"""The serving stage's records: per pairing and level, throughput and latency over every
repeat, acceptance from the engine's counters, the speedup paired by repeat against the
target alone at the same level, and the greedy lossless check."""

from __future__ import annotations

from collections.abc import Iterator

from qspec.backends.vllm_server import linear_kernels
from qspec.measure.concurrency import LevelLoad, engine_acceptance, paired_by_repeat
from qspec.measure.stats import ratio_interval
from qspec.records import ServingRecord


def _load(levels) -> LevelLoad:
    return LevelLoad(tuple(tuple(lv.results) for lv in levels), tuple(lv.wall_s for lv in levels))


def level_records(ctx, s, base, prompts, meta: dict) -> Iterator[ServingRecord]:
    """One record per cell of one served pairing `s`; `base` is the target alone's (or None)."""
    v = ctx.cfg.vllm
    lowest = min(v.concurrency)
    kernels = linear_kernels(s.server.log_path) if s.server is not None else []
    for c in s.cells:
        common = {
            **c.coordinates(),
            **meta,
            "server": v.url or "started by qspec",
            "method": (s.spec.speculative or {}).get("method") if s.spec else None,
            "speculative_config": s.spec.speculative if s.spec else None,
            "n_prompts": len(prompts),
            "repeats": v.repeats,
            "gpu_memory_utilization": s.spec.gpu_memory_utilization if s.spec else None,
            "max_new_tokens": ctx.cfg.max_new_tokens,
            "vllm_kernels": kernels,
        }
        levels = s.levels.get((c.mode, c.concurrency), [])
        if c.mode in s.refused:  # vLLM's own defect here: never measured
            yield ServingRecord(**common, status="unavailable", error=s.refused[c.mode])
            continue
        if s.status != "ok" or not levels:
            error = s.error or "not measured"
            status = s.status if s.status != "ok" else "failed"
            yield ServingRecord(**common, status=status, error=error, log_tail=s.log_tail)
            continue
        load = _load(levels)
        f = load.fields(v.slo_ttft_s, v.slo_tpot_s)
        f["n_requests"] = len(levels[0].results)
        counters = s.counters.get((c.mode, c.concurrency))
        if counters is not None and counters.present:
            f.update(
                engine_acceptance(
                    counters.drafts, counters.draft_tokens, counters.accepted, counters.per_position
                )
            )
            if v.url is not None:
                f["gamma"] = counters.gamma
                f["method"] = "as served"
        if c.mode == "greedy" and c.concurrency == lowest and s.draft is None and s.qspec_loop:
            f.update(_loops(load, s.qspec_loop), qspec_numerics=s.qspec_numerics)
        if c.mode == "greedy":
            f["outputs"] = _outputs(levels[0], prompts)
            first = s.levels.get((c.mode, lowest))
            if first:
                f["same_as_lowest_concurrency"] = not _mismatches(levels[0], first[0], prompts)
        baseline = base.levels.get((c.mode, c.concurrency)) if base is not None else None
        if s is not base and base is not None and base.status == "ok" and baseline:
            f.update(paired_by_repeat(load, _load(baseline)))
            if c.mode == "greedy":
                bad = _mismatches(levels[0], baseline[0], prompts)
                f["lossless"], f["lossless_mismatches"] = not bad, bad
        yield ServingRecord(**{**common, **f})


def _loops(load: LevelLoad, qspec: dict[int, tuple[int, float]]) -> dict:
    """qspec's loop over vLLM at this level (one request at a time), paired by repeat: qspec's
    tokens/s over the prompts against vLLM's output tokens/s of the same repeat."""
    theirs = load.totals_per_s()
    ratios = [
        (tokens / seconds) / theirs[r]
        for r, (tokens, seconds) in qspec.items()
        if seconds > 0 and r < len(theirs) and theirs[r] > 0
    ]
    if not ratios:
        return {}
    mean, low, high = ratio_interval(ratios)
    rates = [tokens / seconds for tokens, seconds in qspec.values() if seconds > 0]
    return {
        "qspec_tokens_per_s": ratio_interval(rates)[0],
        "qspec_over_vllm": mean,
        "qspec_over_vllm_ci95": [low, high] if low is not None else None,
        "qspec_over_vllm_pairs": len(ratios),
    }


def _outputs(level, prompts) -> dict[str, list[int]]:
    """Each prompt's tokens, from its first request of the level."""
    out: dict[str, list[int]] = {}
    for r in level.results:
        if r.ok:
            out.setdefault(prompts[r.prompt].id, list(r.tokens))
    return out


def _mismatches(level, other, prompts) -> list[str]:
    """Prompt ids whose tokens differ between two levels' requests of the same slot."""
    theirs = {r.slot: r.tokens for r in other.results if r.ok}
    bad = {
        prompts[r.prompt].id
        for r in level.results
        if r.ok and r.slot in theirs and r.tokens != theirs[r.slot]
    }
    # a slot that one level has and the other not (another level's schedule): compare by prompt
    firsts = _outputs(other, prompts)
    bad |= {
        prompts[r.prompt].id
        for r in level.results
        if r.ok and r.slot not in theirs and r.tokens != firsts.get(prompts[r.prompt].id)
    }
    return sorted(bad)

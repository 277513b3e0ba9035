"""The runner's logic without running models: plan, spread, keys, resume selection, baselines."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from qspec.config import parse_config
from qspec.keys import Finished, key_of_cell, key_of_stage
from qspec.plan import Cell, plan
from qspec.records import GenerationRecord, Kind, Output, QualityRecord, TaskRecord, parse
from qspec.suites.encoding import spread

FIXTURE = Path(__file__).parent / "data" / "results-small" / "results.jsonl"
VERSIONS = {"torch": "2.13.0"}


def config(**overrides):
    base = {
        "gammas": [2, 4],
        "modes": ["greedy", "sample"],
        "sampled_targets": "all",
        "target": {"precisions": ["fp32", "nf4"]},
        "draft": {"precisions": ["int8", "ngram"]},
    }
    return parse_config({**base, **overrides})


def test_plan_puts_each_baseline_before_the_cells_that_compare_with_it():
    cells = plan(config(), ["default"], "cpu")
    seen = set()
    for c in cells:
        if c.kind == Kind.TARGET_ONLY:
            seen.add((c.target, c.mode))
        else:
            assert (c.target, c.mode) in seen, c
    # 2 targets x 2 modes x (1 baseline + 2 drafts x 2 gammas), plus the peer on the reference
    spec = [c for c in cells if c.kind == Kind.SPECULATIVE]
    assert len(spec) == 2 * 2 * 2 * 2
    peers = [c for c in cells if c.kind == Kind.HF_ASSISTED]
    assert {(c.target, c.mode) for c in peers} == {("fp32", "greedy")}
    # one per draft at the largest gamma; the n-gram drafter's also at transformers' defaults
    assert sorted((c.draft, c.gamma) for c in peers) == [("int8", 4), ("ngram", 4), ("ngram", 10)]


def test_sampled_cells_on_the_reference_target_only_by_default():
    cfg = config(sampled_targets="reference")
    sampled = {c.target for c in plan(cfg, ["a"], "cpu") if c.mode == "sample"}
    greedy = {c.target for c in plan(cfg, ["a"], "cpu") if c.mode == "greedy"}
    assert sampled == {"fp32"} and greedy == {"fp32", "nf4"}
    assert parse_config({}).sampled_targets == "reference"


def test_plan_peer_on_every_target_and_mode_when_asked():
    cfg = config(hf_assisted_targets="all", hf_assisted_modes=["greedy", "sample"])
    peers = [c for c in plan(cfg, ["a", "b"], "cpu") if c.kind == Kind.HF_ASSISTED]
    assert len(peers) == 2 * 2 * 2 * 3  # suites x targets x modes x (drafts + lookup defaults)
    no_peer = config(baselines=["target_only"])
    assert not [c for c in plan(no_peer, ["a"], "cpu") if c.kind == Kind.HF_ASSISTED]


def test_plan_reference_follows_the_device():
    cfg = config(target={"precisions": ["fp32", "fp16"]})
    assert {c.target for c in plan(cfg, ["a"], "cuda") if c.kind == Kind.HF_ASSISTED} == {"fp16"}
    assert {c.target for c in plan(cfg, ["a"], "cpu") if c.kind == Kind.HF_ASSISTED} == {"fp32"}


@dataclass
class P:
    id: str
    category: str


def test_spread_takes_prompts_round_robin_across_categories():
    prompts = [P("c1", "code"), P("c2", "code"), P("c3", "code"), P("q1", "qa"), P("s1", "sum")]
    assert [p.id for p in spread(prompts, 3)] == ["c1", "q1", "s1"]
    assert [p.id for p in spread(prompts, 4)] == ["c1", "q1", "s1", "c2"]
    assert len(spread(prompts, 50)) == 5
    assert spread([], 3) == []


def test_keys_change_with_what_determines_a_result_and_only_then():
    cell = Cell(Kind.SPECULATIVE, "default", "fp32", "ngram", 2, "greedy")
    cfg = config()
    key = key_of_cell(cell, cfg, "cpu", VERSIONS)
    assert key == key_of_cell(cell, config(), "cpu", VERSIONS)
    different = [
        key_of_cell(cell, config(max_new_tokens=99), "cpu", VERSIONS),
        key_of_cell(cell, config(seed=1), "cpu", VERSIONS),
        key_of_cell(cell, config(sampling={"temperature": 0.5}), "cpu", VERSIONS),
        key_of_cell(cell, cfg, "cuda", VERSIONS),
        key_of_cell(cell, cfg, "cpu", {"torch": "2.14.0"}),
        key_of_cell(
            Cell(Kind.SPECULATIVE, "default", "fp32", "ngram", 4, "greedy"), cfg, "cpu", VERSIONS
        ),
    ]
    assert key not in different and len(set(different)) == len(different)
    # a gamma list change does not touch a cell's own result ...
    assert key == key_of_cell(cell, config(gammas=[2]), "cpu", VERSIONS)
    # ... but does change a stage that predicts for every gamma
    assert key_of_stage(Kind.QUALITY, cfg, "cpu", VERSIONS, suite="a") != key_of_stage(
        Kind.QUALITY, config(gammas=[2]), "cpu", VERSIONS, suite="a"
    )


def rec(kind=Kind.SPECULATIVE, mode="greedy", status="ok", tokens_per_s=2.0, outputs=(), **kw):
    return GenerationRecord(
        kind=kind,
        suite="s",
        target="fp32",
        mode=mode,
        status=status,
        tokens_per_s=tokens_per_s,
        outputs=[Output(id=i, tokens=t) for i, t in outputs],
        **kw,
    )


def test_resume_skips_ok_and_unavailable_records_only():
    done = Finished(
        [
            rec(key="a", status="ok"),
            rec(key="b", status="unavailable"),
            rec(key="c", status="failed"),
            TaskRecord(key="t1", stage_key="T", suite="s", task="x"),
            TaskRecord(key="t2", stage_key="T", suite="s", task="y"),
            TaskRecord(key="u1", stage_key="U", suite="s", task="x"),
            TaskRecord(key="u2", stage_key="U", suite="s", task="y", status="failed"),
        ]
    )
    assert done.cell("a") and done.cell("b")
    assert done.cell("c") is None and done.cell("missing") is None
    assert done.stage("T") and not done.stage("U") and not done.stage("V")


def test_writers_cannot_invent_field_names():
    with pytest.raises(ValidationError):
        QualityRecord(suite="s", kl_se=0.1)  # the old second name of kl_mean_se
    with pytest.raises(ValidationError):
        rec(speed_up=1.0)


def test_records_of_the_previous_layout_load_with_todays_names():
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    parsed = [parse(r) for r in raw]
    unknown = [r for r, p in zip(raw, parsed, strict=True) if p is None]
    assert [r["kind"] for r in unknown] == ["some_future_kind"]
    q = next(p for p in parsed if p is not None and p.kind == Kind.QUALITY and p.variant == "int8")
    assert (q.positions, q.kl_mean_se, q.dp_rms) == (1024, 0.0009, 0.011)
    roundtrip = parse(q.dump())
    assert roundtrip == q


def test_plan_and_records_do_not_import_torch():
    import subprocess

    code = (
        "import sys, qspec.plan, qspec.records, qspec.config, qspec.jobs, qspec.report;"
        "qspec.config.load_config(None); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_configs_are_valid():
    from qspec.config import load_config

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert plan(cfg.model_copy(update={"gammas": cfg.gammas or [3]}), ["default"], "cpu")


def test_adaptive_lengths_are_cells_of_their_own_and_model_drafts_only_stop_on_confidence():
    cfg = config(draft_lengths=["fixed", "confidence", "heuristic"])
    spec = [c for c in plan(cfg, ["a"], "cpu") if c.kind == Kind.SPECULATIVE]
    by = {(c.draft, c.draft_length) for c in spec}
    assert ("int8", "confidence") in by and ("ngram", "confidence") not in by
    assert ("ngram", "heuristic") in by
    fixed = Cell(Kind.SPECULATIVE, "a", "fp32", "int8", 2, "greedy")
    # a fixed cell keeps the key it had before draft lengths existed
    assert key_of_cell(fixed, cfg, "cpu", VERSIONS) == key_of_cell(fixed, config(), "cpu", VERSIONS)
    conf = Cell(Kind.SPECULATIVE, "a", "fp32", "int8", 2, "greedy", "confidence")
    assert key_of_cell(conf, cfg, "cpu", VERSIONS) != key_of_cell(
        conf, config(confidence_threshold=0.5), "cpu", VERSIONS
    )


def test_the_config_names_every_builder_and_drafter_there_is():
    """The torch-free name lists the config validates against match the registries."""
    from qspec.engine.drafters import MODEL_FREE_DRAFTERS
    from qspec.models.builders import PRECISIONS
    from qspec.models.precisions import MODEL_FREE_DRAFTER_NAMES, PRECISION_NAMES

    assert tuple(PRECISIONS) == PRECISION_NAMES
    assert tuple(MODEL_FREE_DRAFTERS) == MODEL_FREE_DRAFTER_NAMES

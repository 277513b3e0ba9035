"""Task accuracy through lm-eval, and the lossless check through qspec's own engine.

Fast tests use tiny random Llamas with the real SmolLM2 tokenizer on 6-doc tasks
written to tmp_path; the slow ones run the default suite on the real fp32 model.
"""

from __future__ import annotations

import copy
import json
import logging
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from qspec.engine.drafters import ModelDrafter, NgramDrafter
from qspec.lmeval import harness as qtasks
from qspec.lmeval import hub
from qspec.lmeval.harness import run_tasks
from qspec.lmeval.hf_models import quiet_lm, speculative_lm
from qspec.lmeval.hub import OFFLINE_VARS, hub_reachable
from qspec.lmeval.lossless import _outputs as lossless_outputs
from qspec.lmeval.lossless import lossless_check
from qspec.measure.stats import paired_delta
from qspec.suites.discovery import load_suite
from qspec.suites.folder import Suite, load_suite_dir

MC_TASK, GEN_TASK = "tiny_mc", "tiny_gen"

MC_DOCS = [
    {
        "question": "Which colour is the sky on a clear day?",
        "choices": ["blue", "green"],
        "label": 0,
    },
    {"question": "How many legs has a spider?", "choices": ["six", "eight", "ten"], "label": 1},
    {"question": "What does a bee make?", "choices": ["milk", "honey"], "label": 1},
    {"question": "Which is a fruit?", "choices": ["apple", "carrot", "onion"], "label": 0},
    {"question": "What is frozen water?", "choices": ["steam", "ice"], "label": 1},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "fish"], "label": 1},
]
GEN_DOCS = [
    {"text": "import os\nimport sys\nimport os\nimport", "target": " sys"},
    {"text": "one two three one two three one two", "target": " three"},
    {"text": "def add(a, b):\n    return a +", "target": " b"},
    {"text": "red green blue red green blue red", "target": " green"},
    {"text": "x = 1\ny = 2\nz =", "target": " 3"},
    {"text": "Monday Tuesday Wednesday Monday Tuesday", "target": " Wednesday"},
]

MC_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """\
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: text
doc_to_target: target
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


def write_tiny_suite(root: Path) -> Path:
    folder = root / "tiny-suite"
    folder.mkdir(parents=True)
    _jsonl(folder / "mc.jsonl", MC_DOCS)
    _jsonl(folder / "gen.jsonl", GEN_DOCS)
    (folder / "mc.yaml").write_text(MC_YAML, encoding="utf-8")
    (folder / "gen.yaml").write_text(GEN_YAML, encoding="utf-8")
    (folder / "suite.toml").write_text(
        'name = "tiny"\ntasks = ["mc.yaml", "gen.yaml"]\n', encoding="utf-8"
    )
    return folder


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def tiny_target(tokenizer):
    return tiny_llama(0, vocab=len(tokenizer))


@pytest.fixture(scope="module")
def tiny_draft(tokenizer):
    return tiny_llama(1, vocab=len(tokenizer))


@pytest.fixture
def tiny_suite(tmp_path) -> Suite:
    return load_suite_dir(write_tiny_suite(tmp_path), "path")


def _by_key(records: list[dict]) -> dict[tuple[str, str | None], dict]:
    return {(r.task, r.metric): r for r in records}


def test_run_tasks_tiny_model(tiny_target, tokenizer, tiny_suite, tmp_path):
    records = run_tasks(tiny_target, tokenizer, tiny_suite, tmp_path / "work", limit=None)
    got = _by_key(records)
    assert set(got) == {(MC_TASK, "acc"), (MC_TASK, "acc_norm"), (GEN_TASK, "exact_match")}
    for rec in records:
        assert rec.status == "ok", rec
        assert rec.error is None
        assert rec.n == 6
        assert 0.0 <= rec.value <= 1.0
        assert rec.stderr is None or rec.stderr >= 0.0
        # per-doc outcomes, for pairing with another variant; their mean is the value
        assert rec.higher_is_better is True
        assert sorted(rec.doc_scores) == [str(i) for i in range(6)]
        assert set(rec.doc_scores.values()) <= {0.0, 1.0}
        assert sum(rec.doc_scores.values()) / 6 == pytest.approx(rec.value)
        assert rec.suite == "tiny"
    # the YAMLs were materialized (absolute data paths) into work_dir/tasks/<suite>/
    assert sorted(p.name for p in (tmp_path / "work" / "tasks" / "tiny").iterdir()) == [
        "gen.yaml",
        "mc.yaml",
    ]


def test_metric_records_direction_and_doc_scores():
    """lm-eval's layout: per-doc metric values in the logged samples, one entry per filter."""
    samples = [
        {"doc_id": d, "filter": f, "exact_match": float(d % 2 == (f == "strict")), "bleu": (d, d)}
        for f in ("strict", "flex")
        for d in range(3)
    ]
    results = {
        "results": {
            "t": {
                "exact_match,strict": 1 / 3,
                "exact_match_stderr,strict": 0.3,
                "exact_match,flex": 2 / 3,
                "exact_match_stderr,flex": "N/A",
                "bleu,strict": 5.0,
                "ter,strict": 80.0,
                "sample_len": 3,
            }
        },
        "higher_is_better": {"t": {"exact_match": True, "bleu": True, "ter": False}},
        "n-samples": {"t": {"original": 9, "effective": 3}},
        "samples": {"t": samples},
    }
    got = {r["metric"]: r for r in qtasks.metric_records(results, 1.0)}
    assert got["exact_match,strict"]["doc_scores"] == {"0": 0.0, "1": 1.0, "2": 0.0}
    assert got["exact_match,flex"]["doc_scores"] == {"0": 1.0, "1": 0.0, "2": 1.0}
    assert got["exact_match,flex"]["higher_is_better"] is True
    assert got["bleu,strict"]["doc_scores"] == {}  # a corpus-level metric: tuples per doc
    assert got["ter,strict"]["higher_is_better"] is False and got["ter,strict"]["doc_scores"] == {}
    # without logged samples or a direction: empty, None
    bare = {k: v for k, v in results.items() if k not in ("samples", "higher_is_better")}
    for rec in qtasks.metric_records(bare, 1.0):
        assert rec["doc_scores"] == {} and rec["higher_is_better"] is None


def test_two_variants_pair_per_document(tiny_target, tiny_draft, tokenizer, tiny_suite, tmp_path):
    a = _by_key(run_tasks(tiny_target, tokenizer, tiny_suite, tmp_path / "a", limit=None))
    b = _by_key(run_tasks(tiny_draft, tokenizer, tiny_suite, tmp_path / "b", limit=None))
    for key, ref in a.items():
        d = paired_delta(b[key].doc_scores, ref.doc_scores, ref.higher_is_better)
        assert d["n"] == 6
        assert d["delta_mean"] == pytest.approx(b[key].value - ref.value)
        assert isinstance(d["significant_drop"], bool)
        same = paired_delta(ref.doc_scores, ref.doc_scores, True)
        assert same["delta_mean"] == 0 and same["significant_drop"] is False


def test_run_tasks_limit_and_selection(tiny_target, tokenizer, tiny_suite, tmp_path):
    records = run_tasks(
        tiny_target, tokenizer, tiny_suite, tmp_path / "work", limit=3, tasks=[MC_TASK]
    )
    assert {r.task for r in records} == {MC_TASK}
    assert all(r.status == "ok" and r.n == 3 for r in records)


def test_run_tasks_is_deterministic(tiny_target, tokenizer, tiny_suite, tmp_path):
    a = run_tasks(tiny_target, tokenizer, tiny_suite, tmp_path / "a", limit=None)
    b = run_tasks(tiny_target, tokenizer, tiny_suite, tmp_path / "b", limit=None)
    strip = [r.model_dump(exclude={"seconds"}) for r in a]
    assert strip == [r.model_dump(exclude={"seconds"}) for r in b]


def test_plain_speculative_lm_matches_hflm(tiny_target, tokenizer, tiny_suite, tmp_path):
    """Target-only decoding through qspec's engine returns what HF generate returns."""
    work = tmp_path / "work" / "tasks" / "tiny"
    qtasks.local_tasks(tiny_suite, work)
    manager = qtasks.task_manager(work, False)
    ours = speculative_lm(tiny_target, tokenizer)
    runs = [
        qtasks.evaluate(lm, GEN_TASK, manager, limit=None, seed=1, log_samples=True)
        for lm in (quiet_lm(tiny_target, tokenizer), ours)
    ]
    hf, mine = (lossless_outputs(r, GEN_TASK) for r in runs)
    assert len(hf) == 6
    assert hf == mine
    assert ours.stats["generations"] == 6 and ours.stats["drafted"] == 0


@pytest.fixture(scope="module")
def noisy_copy(tiny_target):
    """The target with small weight noise: agrees often but not always (partial acceptance)."""
    model = copy.deepcopy(tiny_target)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.1)
    return model


@pytest.mark.parametrize("kind", ["model", "noisy_copy", "ngram"])
def test_lossless_tiny(kind, tiny_target, tiny_draft, noisy_copy, tokenizer, tiny_suite, tmp_path):
    drafts = {"model": tiny_draft, "noisy_copy": noisy_copy}

    def factory():
        return ModelDrafter(drafts[kind]) if kind in drafts else NgramDrafter()

    res = lossless_check(
        tiny_target,
        tokenizer,
        tiny_suite,
        tmp_path / "work",
        drafter_factory=factory,
        gamma=3,
        task=GEN_TASK,
        limit=None,
    )
    assert res.status == "ok", res
    assert res.n == 6
    assert res.metric == "exact_match"
    assert res.accuracy_speculative == res.accuracy_plain
    assert res.equal is True
    assert res.outputs_identical is True
    assert res.mismatched_docs == []
    if kind in drafts:
        assert res.acceptance is not None  # drafts were really proposed and verified
    if kind == "noisy_copy":
        assert 0.0 < res.acceptance < 1.0  # accepted, rejected and rolled back


def test_speculative_lm_drafts_and_makes_fresh_drafters(tiny_target, tiny_draft, tokenizer):
    made = []

    def factory():
        made.append(ModelDrafter(tiny_draft))
        return made[-1]

    lm = speculative_lm(tiny_target, tokenizer, drafter_factory=factory, gamma=3)
    ctx = torch.tensor([tokenizer.encode("a b c a b c a b")])
    out = lm._model_generate(ctx, max_length=ctx.shape[1] + 6, stop=["\n"])
    out2 = lm._model_generate(ctx, max_length=ctx.shape[1] + 6, stop=["\n"])
    assert out.shape[0] == 1 and torch.equal(out[0, : ctx.shape[1]], ctx[0])
    assert 0 < out.shape[1] - ctx.shape[1] <= 6
    assert torch.equal(out, out2)
    assert len(made) == 2 and made[0] is not made[1]
    assert lm.stats["drafted"] > 0


def test_stop_strings_end_generation_early(tiny_target, tokenizer):
    """A stop string ends the engine's loop; lm-eval cuts the text at the stop anyway."""
    lm = speculative_lm(tiny_target, tokenizer)
    ctx = torch.tensor([tokenizer.encode("hello world")])
    free = lm._model_generate(ctx, max_length=ctx.shape[1] + 20, stop=[])[0, ctx.shape[1] :]
    text = tokenizer.decode(free.tolist())
    # stop at whatever the model's second generated token says
    second = tokenizer.decode(free[1:2].tolist())
    assert second
    out = lm._model_generate(ctx, max_length=ctx.shape[1] + 20, stop=[second])[0, ctx.shape[1] :]
    assert len(out) <= 2
    assert torch.equal(out, free[: len(out)])
    assert text.split(second)[0] == tokenizer.decode(out.tolist()).split(second)[0]


def test_broken_task_is_recorded_and_others_run(tiny_target, tokenizer, tmp_path):
    folder = write_tiny_suite(tmp_path)
    (folder / "garbage.jsonl").write_text("{this is not json\n", encoding="utf-8")
    (folder / "bad_data.yaml").write_text(
        MC_YAML.replace("tiny_mc", "tiny_bad").replace("mc.jsonl", "garbage.jsonl"),
        encoding="utf-8",
    )
    suite = Suite(
        name="broken",
        path=folder,
        origin="test",
        task_files=[folder / "missing.yaml", folder / "bad_data.yaml", folder / "mc.yaml"],
    )
    records = run_tasks(tiny_target, tokenizer, suite, tmp_path / "work", limit=None)
    failed = [r for r in records if r.status == "failed"]
    assert {r.task for r in failed} == {"missing", "tiny_bad"}
    for rec in failed:
        assert rec.error and rec.value is None and rec.n == 0
    assert "not found" in next(r for r in failed if r.task == "missing").error
    ok = [r for r in records if r.status == "ok"]
    assert {(r.task, r.metric) for r in ok} == {(MC_TASK, "acc"), (MC_TASK, "acc_norm")}

    records = run_tasks(
        tiny_target, tokenizer, suite, tmp_path / "work", limit=2, tasks=["nope", MC_TASK]
    )
    nope = [r for r in records if r.task == "nope"]
    assert len(nope) == 1 and nope[0].status == "failed"
    assert "not in suite" in nope[0].error
    assert all(r.status == "ok" and r.n == 2 for r in records if r.task == MC_TASK)


def test_registry_tasks_unavailable_without_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable()[0] is False
    suite = Suite(name="hubby", path=tmp_path, origin="test", task_names=["hellaswag", "gsm8k"])
    start = time.perf_counter()
    records = run_tasks(None, None, suite, tmp_path / "work", limit=5)
    assert time.perf_counter() - start < 5
    assert [r.task for r in records] == ["hellaswag", "gsm8k"]
    for rec in records:
        assert rec.status == "unavailable"
        assert "hub" in rec.error and "HF_HUB_OFFLINE" in rec.error
    res = lossless_check(
        None, None, suite, tmp_path, drafter_factory=NgramDrafter, gamma=3, task="gsm8k", limit=5
    )
    assert res.status == "unavailable" and "hub" in res.error


def test_hub_probe_fails_fast(monkeypatch):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "HUB_HOST", ("hub.invalid", 443))
    start = time.perf_counter()
    ok, reason = hub_reachable(timeout=1.0)
    assert not ok and reason
    assert time.perf_counter() - start < 3


def test_lossless_check_needs_a_generation_task(tiny_suite, tmp_path):
    res = lossless_check(
        None,
        None,
        tiny_suite,
        tmp_path,
        drafter_factory=NgramDrafter,
        gamma=3,
        task=MC_TASK,
        limit=2,
    )
    assert res.status == "unavailable" and "generate_until" in res.error
    res = lossless_check(
        None,
        None,
        tiny_suite,
        tmp_path,
        drafter_factory=NgramDrafter,
        gamma=3,
        task="nope",
        limit=2,
    )
    assert res.status == "failed" and "not in suite" in res.error


def test_lm_eval_loads_only_when_tasks_are_scored():
    """The command line asks the hub before any model loads, and a run without tasks never
    pays lm-eval's import: only the modules that score tasks import it."""
    import subprocess
    import sys

    code = (
        "import sys, qspec.cli, qspec.lmeval.hub, qspec.stages.accuracy; "
        "print('lm_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- slow: the real model


@pytest.fixture(scope="module")
def real_model(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.slow
def test_default_suite_real_model(real_model, tmp_path):
    model, tok = real_model
    suite = load_suite("default")
    records = run_tasks(model, tok, suite, tmp_path, limit=20)
    got = _by_key(records)
    assert set(got) == {
        ("qspec_default_docname", "acc"),
        ("qspec_default_docname", "acc_norm"),
        ("qspec_default_import", "exact_match"),
    }
    for rec in records:
        assert rec.status == "ok" and rec.n == 20 and 0.0 <= rec.value <= 1.0
        print(f"{rec.task} {rec.metric} = {rec.value:.3f} ({rec.seconds:.1f} s)")
    # a 135M instruct model does better than chance on the function-name quiz
    assert got[("qspec_default_docname", "acc")].value > 0.0


@pytest.mark.slow
def test_lossless_nf4_self_draft(real_model, default_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model, tok = real_model
    nf4 = AutoModelForCausalLM.from_pretrained(
        default_model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        device_map="cpu",
    ).eval()
    res = lossless_check(
        model,
        tok,
        load_suite("default"),
        tmp_path,
        drafter_factory=lambda: ModelDrafter(nf4, name="nf4"),
        gamma=3,
        task="qspec_default_import",
        limit=20,
    )
    print(textwrap.shorten(json.dumps(res.dump()), 400))
    assert res.status == "ok", res
    assert res.n == 20
    assert res.equal is True and res.outputs_identical is True
    assert res.accuracy_plain == res.accuracy_speculative
    assert res.acceptance is not None and res.acceptance > 0

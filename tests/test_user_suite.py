"""A suite written by a user, found on QSPEC_SUITES_PATH, runs end to end with its own task."""

from __future__ import annotations

import json

from conftest import write_config

from qspec import store
from qspec.cli import main

TASK = """task: tiny_colors
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/colors.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""

QUESTIONS = [
    ("What colour is a clear daytime sky?", ["blue", "green", "red"], 0),
    ("What colour is fresh grass?", ["purple", "green", "black"], 1),
    ("What colour is fresh snow?", ["white", "orange", "brown"], 0),
    ("What colour is a ripe tomato?", ["grey", "blue", "red"], 2),
]


def make_suite(root):
    suite = root / "my-colors"
    (suite / "data").mkdir(parents=True)
    (suite / "tasks").mkdir()
    (suite / "corpus.txt").write_text(
        "The sky was blue and the grass was green all through the long summer. " * 8
    )
    prompts = [
        {"id": "sky", "category": "qa", "prompt": "Describe the colour of the sky at noon."},
        {
            "id": "chat-1",
            "category": "chat",
            "messages": [{"role": "user", "content": "Name three colours."}],
        },
    ]
    (suite / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    rows = [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS]
    (suite / "data" / "colors.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (suite / "tasks" / "colors.yaml").write_text(TASK)
    (suite / "suite.toml").write_text(
        'description = "colours"\ncorpus = "corpus.txt"\nprompts = "prompts.jsonl"\ntasks = ["tasks/colors.yaml"]\n'
    )


def test_user_suite_on_search_path_runs_with_its_task(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    make_suite(tmp_path / "suites")
    monkeypatch.setenv("QSPEC_SUITES_PATH", str(tmp_path / "suites"))
    assert main(["suites"]) == 0
    assert "my-colors" in capsys.readouterr().out
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        modes='["greedy"]',
        baselines='["target_only"]',
        suites='["my-colors"]',
        _target='precisions = ["fp32"]',
        _draft='precisions = ["ngram"]',
        _tasks="enabled = true\nlimit = 4",
    )
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    recs = store.read(out / "results.jsonl")
    gen = [r for r in recs if r["kind"] == "speculative"]
    assert gen and gen[0]["suite"] == "my-colors" and gen[0]["status"] == "ok"
    assert {o["category"] for o in gen[0]["outputs"]} == {"qa", "chat"}
    acc = [r for r in recs if r["kind"] == "task" and r.get("metric") == "acc"]
    assert len(acc) == 1 and acc[0]["task"] == "tiny_colors" and acc[0]["n"] == 4
    assert 0.0 <= acc[0]["value"] <= 1.0 and acc[0]["stderr"] is not None
    assert any(r["kind"] == "quality" and r["suite"] == "my-colors" for r in recs)

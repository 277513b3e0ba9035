"""The run cut into Ray jobs, and what a dead job loses: torch-free, no cluster needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qspec.config import ConfigError, parse_config
from qspec.jobs import Job, jobs, lost_records
from qspec.keys import Finished, key_of_cell
from qspec.plan import SuitePlan, plan, planned
from qspec.records import GenerationRecord

VERSIONS = {"torch": "2.13.0"}


def config(**overrides):
    base = {
        "gammas": [3],
        "target": {"precisions": ["fp32", "nf4"]},
        "draft": {"precisions": ["int8", "ngram"]},
        "executor": "ray",
    }
    return parse_config({**base, **overrides})


def test_one_generation_and_one_tasks_job_per_target_after_the_build():
    first, rest = jobs(config())
    assert first == Job("variants")
    assert rest == [
        Job("quality"),
        Job("generation", "fp32"),
        Job("generation", "nf4"),
        Job("tasks", "fp32"),
        Job("tasks", "nf4"),
    ]
    _, lean = jobs(config(quality={"enabled": False}, tasks={"enabled": False}))
    assert [j.stage for j in lean] == ["generation", "generation"]


def test_a_dead_generation_job_loses_only_its_targets_unwritten_cells():
    cfg = config()
    everything = planned(cfg, [SuitePlan("default")], "cpu", VERSIONS)
    cells = plan(cfg, ["default"], "cpu")
    mine = [c for c in cells if c.target == "nf4"]
    key = {c: key_of_cell(c, cfg, "cpu", VERSIONS) for c in cells}
    written = {key[mine[0]]}  # the worker sent its first record back before dying
    done = GenerationRecord(key=key[mine[1]], kind=mine[1].kind, suite="default", target="nf4")
    lost = lost_records(
        Job("generation", "nf4"),
        everything,
        written,
        Finished([done]),  # stored by an earlier attempt
        "generation nf4: worker died: killed",
    )
    assert [r.key for r in lost] == [key[c] for c in mine[2:]]
    assert all(r.status == "failed" and "worker died" in r.error for r in lost)
    assert {r.target for r in lost} == {"nf4"}
    assert [(r.kind, r.draft, r.mode) for r in lost] == [
        (c.kind, c.draft, c.mode) for c in mine[2:]
    ]


def test_a_dead_stage_job_leaves_one_failed_record_per_suite_it_had_not_finished():
    cfg = config()
    suites = [SuitePlan("a", tasks=True, generative_task="gen"), SuitePlan("b")]
    everything = planned(cfg, suites, "cpu", VERSIONS)
    args = (everything, set(), Finished(), "died")
    quality = lost_records(Job("quality"), *args)
    assert [(r.kind, r.suite, r.status) for r in quality] == [
        ("quality", "a", "failed"),
        ("quality", "b", "failed"),
    ]
    tasks = lost_records(Job("tasks", "nf4"), *args)
    assert [(r.kind, r.suite, r.variant, r.task) for r in tasks] == [("task", "a", "nf4", "*")]
    # the reference target's tasks job also checks losslessness, one record per draft
    reference = lost_records(Job("tasks", "fp32"), *args)
    assert [(r.kind, getattr(r, "draft", None)) for r in reference] == [
        ("task", None),
        ("task_lossless", "int8"),
        ("task_lossless", "ngram"),
    ]
    # a suite whose stage record came back is not lost
    written = {quality[0].stage_key}
    again = lost_records(Job("quality"), everything, written, Finished(), "died")
    assert [r.suite for r in again] == ["b"]
    builds = lost_records(Job("variants"), *args)
    model = cfg.target.ref
    assert [(r.model, r.precision) for r in builds if r.kind == "variant"] == [
        (model, "fp32"),
        (model, "nf4"),  # a target here
        (model, "int8"),
    ]
    # the served engine's default draft is a head trained on the reference: built there too
    heads = [(r.name, r.trained_on, r.status) for r in builds if r.kind == "head"]
    assert heads == [("eagle3", "fp32", "failed")]


def test_executor_settings_are_validated():
    assert config().executor == "ray" and config().ray.cpus_per_group == 1
    with pytest.raises(ConfigError, match="executor"):
        config(executor="slurm")
    with pytest.raises(ConfigError, match="ray.gpus_per_group"):
        config(ray={"gpus_per_group": 2})


def test_cutting_a_run_into_jobs_imports_neither_torch_nor_ray():
    code = (
        "import sys, qspec.jobs; "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

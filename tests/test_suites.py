"""Suite discovery, loading and validation (fast: no model is loaded except in the slow test)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from qspec import cache
from qspec.suites import python_docs as builtin_data
from qspec.suites.discovery import builtin_suites_dir, discover_suites, list_suites, load_suite
from qspec.suites.files import SuiteError
from qspec.suites.folder import Prompt, Suite
from qspec.suites.task_yaml import materialize_task_yaml


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Generated task files go to a temporary cache; no stray suites from the environment."""
    monkeypatch.setenv("QSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QSPEC_SUITES_PATH", raising=False)


def make_suite(
    root: Path, name: str = "mine", toml: str | None = None, files: dict | None = None
) -> Path:
    """Write a small valid suite (overridable file by file) and return its folder."""
    folder = root / name
    (folder / "corpus").mkdir(parents=True, exist_ok=True)
    defaults = {
        "suite.toml": 'description = "test"\ncorpus = "corpus/*.txt"\nprompts = "prompts.jsonl"\n',
        "corpus/a.txt": "Some corpus text.\n",
        "prompts.jsonl": '{"id": "p1", "category": "qa", "prompt": "Why?"}\n'
        '{"id": "p2", "category": "chat", "messages": [{"role": "user", "content": "Hi"}]}\n',
    }
    if toml is not None:
        defaults["suite.toml"] = toml
    defaults.update(files or {})
    for rel, text in defaults.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


# ---------------------------------------------------------------- built-in suites


def test_default_suite_loads_offline():
    suite = load_suite("default")
    assert isinstance(suite, Suite)
    assert suite.origin == "builtin" and not suite.requires_hub
    assert suite.declares() == ["corpus", "prompts", "tasks"]
    docs = suite.corpus()
    assert docs and all(isinstance(d, str) for d in docs)
    assert 20_000 <= sum(map(len, docs)) <= 40_000
    assert len(suite.prompts) >= 12
    cats = {p.category for p in suite.prompts}
    assert {"code", "qa", "summarization"} <= cats
    for p in suite.prompts:
        assert isinstance(p, Prompt)
        text = p.prompt if p.prompt is not None else p.messages[0]["content"]
        assert len(text) < 2000
        assert (p.prompt is None) != (p.messages is None)
        assert (p.category == "code") == (p.prompt is not None)
    assert len(suite.task_files) == 2 and all(f.is_file() for f in suite.task_files)
    assert suite.task_names == []


def test_default_tasks_are_valid_lm_eval_configs():
    files = load_suite("default").task_files
    configs = {yaml.safe_load(f.read_text())["task"]: yaml.safe_load(f.read_text()) for f in files}
    assert set(configs) == {builtin_data.MC_TASK, builtin_data.GEN_TASK}
    mc, gen = configs[builtin_data.MC_TASK], configs[builtin_data.GEN_TASK]
    assert mc["output_type"] == "multiple_choice"
    assert {m["metric"] for m in mc["metric_list"]} == {"acc", "acc_norm"}
    assert gen["output_type"] == "generate_until"
    assert gen["metric_list"][0]["metric"] == "exact_match"
    assert "\n" in gen["generation_kwargs"]["until"]
    for cfg in (mc, gen):
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.is_file()
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        assert 50 <= len(rows) <= 100
    rows = [json.loads(x) for x in Path(mc["dataset_kwargs"]["data_files"]["test"]).open()]
    assert all(len(r["choices"]) == 4 and r["choices"][r["label"]] for r in rows)


def test_default_content_is_deterministic():
    def generate():
        builtin_data.module_source.cache_clear()
        builtin_data._tree.cache_clear()
        return (
            builtin_data.corpus(),
            builtin_data.prompts(),
            builtin_data.docname_docs(),
            builtin_data.import_docs(),
        )

    assert generate() == generate()
    first = [p.read_text() for p in builtin_data.tasks()]
    assert [p.read_text() for p in builtin_data.tasks()] == first


def test_default_task_files_are_one_atomic_cache_entry():
    """Written whole into suites/default-<hash of the data>, reused untouched, rebuilt if damaged."""
    files = builtin_data.tasks()
    entry = files[0].parent
    assert entry.parent == cache.cache_root() / "suites" and entry.name.startswith("default-")
    assert [(e.kind, e.name) for e in cache.entries()] == [("suites", entry.name)]
    assert sorted(p.name for p in entry.iterdir() if p.name != cache.STAMP) == sorted(
        f"{t}.{ext}"
        for t in (builtin_data.MC_TASK, builtin_data.GEN_TASK)
        for ext in ("jsonl", "yaml")
    )
    written = files[0].stat().st_ino
    assert builtin_data.tasks() == files and files[0].stat().st_ino == written  # not rewritten
    (entry / f"{builtin_data.MC_TASK}.jsonl").write_text("torn")
    assert builtin_data.tasks() == files
    assert (entry / f"{builtin_data.MC_TASK}.jsonl").read_text().count("\n") >= 50
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temp folders


def test_builtin_suites_live_in_the_top_level_suites_folder():
    """A checkout finds them in suites/ at the top level (a wheel ships the same folder as
    qspec/builtin_suites: test_install.py proves that)."""
    import qspec

    folder = builtin_suites_dir()
    assert folder == Path(qspec.__file__).resolve().parents[1] / "suites"
    found = discover_suites()
    for name in ("default", "standard", "example-custom"):
        assert found[name] == (folder / name, "builtin")


def test_standard_suite_lists_registry_tasks_offline():
    suite = load_suite("standard")
    assert suite.requires_hub
    assert suite.task_names == ["wikitext", "hellaswag", "arc_easy", "gsm8k"]
    assert suite.task_files == [] and suite.prompts == []
    assert suite.declares() == ["tasks"]


def test_example_custom_suite_and_materialize(tmp_path):
    suite = load_suite("example-custom")
    assert len(suite.corpus()) == 2
    assert len(suite.prompts) == 10 and len({p.category for p in suite.prompts}) == 3
    [task_yaml] = suite.task_files
    raw = yaml.safe_load(task_yaml.read_text())
    assert not Path(raw["dataset_kwargs"]["data_files"]["test"]).is_absolute()

    out = materialize_task_yaml(task_yaml, tmp_path / "tasks")
    cfg = yaml.safe_load(out.read_text())
    data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.is_file()
    assert data == suite.path / "data" / "garden_mc.jsonl"
    assert cfg["task"] == raw["task"] == "example_garden_mc"


def test_lm_eval_builds_every_local_task(tmp_path):
    """lm-eval's own loader accepts the YAMLs and reads their data, with no network."""
    from lm_eval.tasks import TaskManager

    out = tmp_path / "tasks"
    for name in ("default", "example-custom"):
        for f in load_suite(name).task_files:
            materialize_task_yaml(f, out)
    tm = TaskManager(include_path=str(out), include_defaults=False)
    names = [builtin_data.MC_TASK, builtin_data.GEN_TASK, "example_garden_mc"]
    tasks = tm.load(names)["tasks"]
    assert set(tasks) == set(names)
    for task in tasks.values():
        docs = list(task.test_docs())
        assert docs and task.doc_to_text(docs[0])


def test_list_suites_reports_builtins_and_errors(tmp_path):
    make_suite(tmp_path, "broken", toml="corpos = 'x'\n")
    rows = {r.name: r for r in list_suites([tmp_path])}
    assert {"default", "standard", "example-custom", "broken"} <= set(rows)
    assert rows["default"].n_prompts >= 12 and rows["default"].n_task_files == 2
    assert rows["default"].declares() == ["corpus", "prompts", "tasks"]
    assert rows["standard"].task_names and rows["standard"].requires_hub
    assert rows["broken"].error and "corpos" in rows["broken"].error


# ---------------------------------------------------------------- discovery


def test_suite_on_env_path(tmp_path, monkeypatch):
    make_suite(tmp_path / "a", "envsuite")
    monkeypatch.setenv("QSPEC_SUITES_PATH", f"{tmp_path / 'nowhere'}:{tmp_path / 'a'}")
    found = discover_suites()
    assert found["envsuite"] == ((tmp_path / "a" / "envsuite").resolve(), "QSPEC_SUITES_PATH")
    suite = load_suite("envsuite")
    assert suite.origin == "QSPEC_SUITES_PATH"
    assert suite.corpus() == ["Some corpus text.\n"]
    assert [p.id for p in suite.prompts] == ["p1", "p2"]
    assert suite.declares() == ["corpus", "prompts"]


def test_precedence_explicit_then_env_then_builtin(tmp_path, monkeypatch):
    make_suite(tmp_path / "env", "default")
    monkeypatch.setenv("QSPEC_SUITES_PATH", str(tmp_path / "env"))
    assert discover_suites()["default"][1] == "QSPEC_SUITES_PATH"
    make_suite(tmp_path / "explicit", "default")
    assert discover_suites([tmp_path / "explicit"])["default"][1] == "path"


def test_load_by_path(tmp_path):
    folder = make_suite(tmp_path, "bypath", toml='name = "renamed"\nprompts = "prompts.jsonl"\n')
    for ref in (folder, str(folder), str(folder / "suite.toml")):
        suite = load_suite(ref)
        assert suite.origin == "path" and suite.name == "renamed" and suite.path == folder
    assert "renamed" in discover_suites([tmp_path])


def test_unknown_suite_lists_known_names():
    with pytest.raises(SuiteError, match=r"unknown suite 'nope'.*default"):
        load_suite("nope")


def test_entry_point_suite(tmp_path, monkeypatch):
    dist = tmp_path / "mypkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[qspec.suites]\nmysuite = mysuitepkg\n")
    pkg = make_suite(tmp_path, "mysuitepkg")
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    found = discover_suites()
    assert found["mysuite"] == (pkg.resolve(), "entry point mypkg")
    suite = load_suite("mysuite")
    assert suite.name == "mysuite" and suite.origin == "entry point mypkg"
    assert len(suite.prompts) == 2
    assert any(r.name == "mysuite" and r.error is None for r in list_suites())


def test_entry_point_attr_and_callable_parts(tmp_path, monkeypatch):
    dist = tmp_path / "other-2.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 2.0\n")
    (dist / "entry_points.txt").write_text("[qspec.suites]\nviaattr = othersuite:where\n")
    folder = make_suite(
        tmp_path,
        "data",
        toml='corpus = { callable = "othersuite:docs" }\n'
        'prompts = { callable = "othersuite:prompts" }\n',
    )
    (tmp_path / "othersuite.py").write_text(
        "from pathlib import Path\n"
        f"def where():\n    return Path({str(folder)!r})\n"
        "def docs():\n    yield 'one'\n    yield 'two'\n"
        "def prompts():\n    return [{'id': 'x', 'category': 'chat', 'prompt': 'hello'}]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = load_suite("viaattr")
    assert suite.origin == "entry point other"
    assert suite.corpus() == ["one", "two"]
    assert suite.prompts == [Prompt(id="x", category="chat", prompt="hello")]


# ---------------------------------------------------------------- malformed suites


def error_for(folder: Path) -> str:
    with pytest.raises(SuiteError) as info:
        load_suite(folder)
    return str(info.value)


def test_bad_toml(tmp_path):
    msg = error_for(make_suite(tmp_path, toml='corpus = "a.txt\n'))
    assert "suite.toml" in msg and "not valid TOML" in msg


def test_unknown_toml_key(tmp_path):
    msg = error_for(make_suite(tmp_path, toml='corpos = "corpus/a.txt"\n'))
    assert "suite.toml: unknown key 'corpos'" in msg
    assert "allowed: corpus, description, name, prompts, requires_hub, tasks" in msg


def test_missing_corpus_file(tmp_path):
    msg = error_for(make_suite(tmp_path, toml='corpus = "missing.txt"\n'))
    assert "suite.toml: corpus file 'missing.txt' not found" in msg
    msg = error_for(make_suite(tmp_path, toml='corpus = ["corpus/a.txt", "none/*.txt"]\n'))
    assert "corpus pattern 'none/*.txt' matched no files" in msg


def test_corpus_not_utf8(tmp_path):
    folder = make_suite(tmp_path)
    (folder / "corpus" / "b.txt").write_bytes(b"caf\xe9\n")
    msg = error_for(folder)
    assert "b.txt: not valid UTF-8" in msg


def test_jsonl_line_not_json(tmp_path):
    bad = '{"id": "a", "category": "qa", "prompt": "x"}\n\n{"id": "b" "category": "qa"}\n'
    msg = error_for(make_suite(tmp_path, files={"prompts.jsonl": bad}))
    assert "prompts.jsonl line 3: not valid JSON (Expecting ','" in msg


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"id": "a", "category": "qa", "prompt": "x", "tmp": 1}', "unknown field 'tmp'"),
        (
            '{"id": "a", "category": "qa"}',
            "needs exactly one of 'prompt' or 'messages', got neither",
        ),
        (
            '{"id": "a", "category": "qa", "prompt": "x", "messages": []}',
            "needs exactly one of 'prompt' or 'messages', got both",
        ),
        ('{"category": "qa", "prompt": "x"}', "missing required field 'id'"),
        ('{"id": 3, "category": "qa", "prompt": "x"}', "field 'id' must be a non-empty string"),
        ('{"id": "a", "category": "qa", "messages": [{"role": "user"}]}', "messages[0]"),
        ('{"id": "a", "category": "qa", "prompt": "x", "max_new_tokens": 0}', "positive integer"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
def test_bad_prompt_records(tmp_path, line, expected):
    ok = '{"id": "first", "category": "qa", "prompt": "x"}\n'
    msg = error_for(make_suite(tmp_path, files={"prompts.jsonl": ok + line + "\n"}))
    assert "prompts.jsonl line 2: " in msg and expected in msg


def test_duplicate_ids(tmp_path):
    lines = '{"id": "a", "category": "qa", "prompt": "x"}\n' * 2
    msg = error_for(make_suite(tmp_path, files={"prompts.jsonl": lines}))
    assert "prompts.jsonl line 2: duplicate id 'a' (first at " in msg and "line 1)" in msg


def test_missing_prompts_file_and_task_file(tmp_path):
    msg = error_for(make_suite(tmp_path, toml='prompts = "nope.jsonl"\n'))
    assert "suite.toml: prompts file 'nope.jsonl' not found" in msg
    msg = error_for(make_suite(tmp_path, "t", toml='tasks = ["tasks/nope.yaml"]\n'))
    assert "suite.toml: task file 'tasks/nope.yaml' not found" in msg


def test_bad_callable(tmp_path):
    msg = error_for(
        make_suite(tmp_path, toml='corpus = { callable = "qspec.suites.python_docs:nope" }\n')
    )
    assert "suite.toml: corpus" in msg and "no attribute 'nope'" in msg
    msg = error_for(make_suite(tmp_path, "c2", toml='corpus = { callable = "nodots" }\n'))
    assert "'module:function'" in msg


def test_task_yaml_function_tag_rejected(tmp_path):
    task = textwrap.dedent(
        """\
        task: t
        dataset_path: json
        process_docs: !function utils.process
        """
    )
    folder = make_suite(tmp_path, toml='tasks = ["tasks/t.yaml"]\n', files={"tasks/t.yaml": task})
    msg = error_for(folder)
    assert "t.yaml" in msg and "!function" in msg and "line 3" in msg


def test_task_yaml_missing_data_file(tmp_path):
    task = (
        "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/none.jsonl\n"
    )
    folder = make_suite(tmp_path, toml='tasks = ["t.yaml", "hellaswag"]\n')
    (folder / "t.yaml").write_text(task)
    msg = error_for(folder)
    assert "t.yaml: data file 'data/none.jsonl' not found" in msg


def test_materialize_resolves_against_yaml_or_suite_folder_and_merges_include(tmp_path):
    files = {
        "data/d.jsonl": '{"q": 1}\n',
        "tasks/near.jsonl": '{"q": 2}\n',
        "tasks/base.yaml": "dataset_path: json\noutput_type: multiple_choice\ntest_split: test\n",
        "tasks/child.yaml": "include: base.yaml\ntask: child\ndataset_kwargs:\n  data_files:\n"
        "    test: data/d.jsonl\n    validation: [near.jsonl]\n",
    }
    folder = make_suite(tmp_path, toml='tasks = ["tasks/child.yaml", "arc_easy"]\n', files=files)
    suite = load_suite(folder)
    assert suite.task_names == ["arc_easy"]
    out = materialize_task_yaml(suite.task_files[0], tmp_path / "out")
    cfg = yaml.safe_load(out.read_text())
    assert cfg["output_type"] == "multiple_choice" and "include" not in cfg
    files = cfg["dataset_kwargs"]["data_files"]
    assert files["test"] == str((folder / "data" / "d.jsonl").resolve())
    assert files["validation"] == [str((folder / "tasks" / "near.jsonl").resolve())]


# ---------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_lm_eval_runs_default_tasks_on_tiny_model(tmp_path, default_model_dir):
    """Both generated tasks run through lm-eval with an in-memory model and no network."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    out = tmp_path / "tasks"
    for f in load_suite("default").task_files:
        materialize_task_yaml(f, out)
    tm = TaskManager(include_path=str(out), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
        tasks=[builtin_data.MC_TASK, builtin_data.GEN_TASK],
        task_manager=tm,
        limit=3,
    )
    assert "acc,none" in res["results"][builtin_data.MC_TASK]
    assert "exact_match,none" in res["results"][builtin_data.GEN_TASK]

"""The cache: atomic entries, every kind listed and evicted, the limit, no import of models."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qspec import cache
from qspec.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("QSPEC_CACHE", str(tmp_path / "cache"))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _text() -> dict:
    return {"capture_output": True, "text": True, "check": True}


# ---------------------------------------------------------------- atomic_dir


def test_atomic_dir_moves_the_finished_folder_into_place(tmp_path):
    final = tmp_path / "kind" / "entry"
    with cache.atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".")
        assert not final.exists()  # nothing is visible until the block succeeds
        (tmp / "weights.bin").write_bytes(b"x")
    assert (final / "weights.bin").read_bytes() == b"x"
    assert _files(final.parent) == ["entry"]  # no temporary folder left


def test_atomic_dir_leaves_nothing_when_the_build_fails(tmp_path):
    final = tmp_path / "kind" / "entry"
    with pytest.raises(RuntimeError, match="interrupted"), cache.atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not final.exists()
    assert _files(final.parent) == []


def test_atomic_dir_failure_keeps_the_previous_entry(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), cache.atomic_dir(final) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
        raise KeyboardInterrupt
    assert _files(final) == ["old.bin"]
    assert _files(tmp_path) == ["entry"]


def test_atomic_dir_replaces_an_existing_entry(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with cache.atomic_dir(final) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert _files(final) == ["new.bin"]
    assert _files(tmp_path) == ["entry"]  # the old copy moved aside is gone too


def test_leftovers_of_a_killed_build_are_cleared_but_a_live_one_is_not(tmp_path):
    root = cache.cache_root()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_text())
    dead, live = int(proc.stdout), os.getpid()
    killed, running = (cache.temp_prefix("abc", pid) + "x" for pid in (dead, live))
    elsewhere = cache.temp_prefix("abc", dead).replace("@", "@other-host-", 1) + "x"
    for name in (killed, running, elsewhere):
        (root / "gptq" / name).mkdir(parents=True)
    assert [p.name for p in cache.leftovers()] == [killed]
    cache.clear()
    assert _files(root / "gptq") == sorted([running, elsewhere])


# ---------------------------------------------------------------- kinds, list, clear, limit


def test_cache_root_reads_qspec_cache_once_for_every_kind(tmp_path, monkeypatch):
    assert cache.cache_root() == tmp_path / "cache"
    assert cache.entry_dir("random-models", "llama-1b") == tmp_path / "cache/random-models/llama-1b"
    with pytest.raises(ValueError, match="unknown cache kind"):
        cache.entry_dir("random", "llama-1b")
    monkeypatch.delenv("QSPEC_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "qspec"


def test_cache_list_and_clear_cover_every_kind(capsys):
    for kind in cache.KINDS:
        if kind == "skip-search":
            path = cache.entry_dir(kind, "abc.json")
            path.parent.mkdir(parents=True)
            path.write_text("{}")
        else:
            with cache.atomic_dir(cache.entry_dir(kind, "e")) as tmp:
                (tmp / "w.bin").write_bytes(b"x" * 10)
    assert main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    for kind in ("models", "gptq", "suites", "random-models"):
        assert f"{kind}/e " in listed
    assert "skip-search/abc.json" in listed
    assert main(["cache", "clear", "random-models/e"]) == 0
    assert "random-models" not in {e.kind for e in cache.entries()}
    assert main(["cache", "clear"]) == 0
    assert cache.entries() == []


def test_random_model_of_the_benchmark_is_a_cache_entry(tmp_path, monkeypatch, capsys):
    """benchmarks/engine.py --random builds into random-models/ atomically and reuses it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(tmp_path / "tok")
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "benchmarks/engine.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_engine", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny", (8, 16, 1, 2, 1))

    calls = []
    original = bench.cache.atomic_dir
    monkeypatch.setattr(bench.cache, "atomic_dir", lambda p: calls.append(p) or original(p))
    out = Path(bench.random_model_dir("tiny", str(tmp_path / "tok")))
    assert out == cache.entry_dir("random-models", "llama-tiny") and calls == [out]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert bench.random_model_dir("tiny", str(tmp_path / "tok")) == str(out)
    assert calls == [out]  # built once
    assert [(e.kind, e.name) for e in cache.entries()] == [("random-models", "llama-tiny")]
    assert main(["cache", "list"]) == 0
    assert "random-models/llama-tiny" in capsys.readouterr().out


def test_gptq_build_is_atomic_and_a_half_written_entry_is_rebuilt(tmp_path, monkeypatch):
    """An interrupted GPTQ build leaves no entry; a pre-atomic half-written folder is not reused."""
    from qspec.models import builders as variants

    class Saves:
        def __init__(self, fail: bool = False):
            self.fail = fail

        def save_pretrained(self, path):
            (Path(path) / "config.json").write_text("{}")  # what transformers writes first
            if self.fail:
                raise KeyboardInterrupt  # Ctrl-C before the weights
            (Path(path) / "model.safetensors").write_bytes(b"w")

    model = Saves(fail=True)
    loads = []
    monkeypatch.setattr(variants, "_need_module", lambda *a: None)
    monkeypatch.setattr(variants, "_gptq_group_size", lambda ctx: 128)
    monkeypatch.setattr(variants, "_load", lambda ctx, **kw: loads.append(ctx.location) or model)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **kw: Saves())
    ctx = variants.BuildContext("some/model", "cpu", calibration_texts=["text"])
    with pytest.raises(KeyboardInterrupt):
        variants.build_gptq_int4(ctx)
    assert cache.entries() == [] and cache.leftovers() == []
    assert _files(cache.cache_root() / "gptq") == []

    model.fail = False
    assert variants.build_gptq_int4(ctx) is model
    [entry] = cache.entries()
    key = entry.name
    source = json.loads((entry.path / "qspec-source.json").read_text())
    assert source["calibration"] == {
        "sha256": hashlib.sha256(b"text").hexdigest(),
        "documents": 1,
        "characters": 4,
    }
    assert (entry.path / "model.safetensors").exists()
    assert variants.build_gptq_int4(ctx) is model and loads[-1] == str(entry.path)  # reused

    # What the old in-place build left when interrupted: config.json, no weights, no marker.
    (entry.path / "qspec-source.json").unlink()
    (entry.path / "model.safetensors").unlink()
    loads.clear()
    variants.build_gptq_int4(ctx)
    assert loads == ["some/model"]  # rebuilt from the source model, not loaded half-written
    assert (cache.entry_dir("gptq", key) / "model.safetensors").exists()


def test_cache_evicts_least_recently_used_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("QSPEC_CACHE", str(tmp_path))
    for i, name in enumerate(["old", "middle", "new"]):
        d = tmp_path / "models" / name
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"x" * 1000)
        cache.touch(d)
        os.utime(d / cache.STAMP, (1000 + i, 1000 + i))
    removed = cache.enforce_limit(keep=tmp_path / "models" / "old", limit=2100)
    assert [e.name for e in removed] == ["middle"]
    assert sorted(e.name for e in cache.entries()) == ["new", "old"]
    assert main(["cache", "list"]) == 0
    assert main(["cache", "clear", "models/new"]) == 0
    assert [e.name for e in cache.entries()] == ["old"]


def test_random_models_count_toward_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("QSPEC_CACHE", str(tmp_path))
    for i, kind in enumerate(["random-models", "models"]):
        with cache.atomic_dir(tmp_path / kind / "e") as tmp:
            (tmp / "w.bin").write_bytes(b"x" * 1000)
        cache.touch(tmp_path / kind / "e")
        os.utime(tmp_path / kind / "e" / cache.STAMP, (1000 + i, 1000 + i))
    removed = cache.enforce_limit(limit=1500)
    assert [(e.kind, e.name) for e in removed] == [("random-models", "e")]


def test_cache_limit_must_be_a_number(monkeypatch):
    monkeypatch.setenv("QSPEC_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="QSPEC_CACHE_MAX_GB='lots'"):
        cache.limit_bytes()


def test_cache_module_does_not_import_models():
    """One owner, no cycle: cache imports nothing from qspec, and nobody else reads QSPEC_CACHE."""
    code = "import sys, qspec.cache; print(sorted(m for m in sys.modules if m.startswith('qspec')))"
    out = subprocess.run([sys.executable, "-c", code], **_text()).stdout
    assert out.strip() == "['qspec', 'qspec.cache']"
    for path in (ROOT / "qspec").rglob("*.py"):
        if path.name != "cache.py":
            text = path.read_text()
            assert "QSPEC_CACHE" not in text or "ENV_VARS" in text, path  # Ray passes it on
            assert "def cache_root" not in text, path


@pytest.mark.parametrize(
    ("hidden", "intermediate", "heads", "group"),
    [(576, 1536, 9, 64), (1024, 4096, 16, 128), (96, 200, 3, 8)],
)
def test_gptq_group_size_divides_every_layer_input(tmp_path, hidden, intermediate, heads, group):
    """The CPU int4 kernel needs whole groups: SmolLM2-135M's width 576 takes 64, not 128."""
    from transformers import LlamaConfig

    from qspec.models import builders as variants

    LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads
    ).save_pretrained(tmp_path)
    ctx = variants.BuildContext(str(tmp_path), "cpu")
    if group < 16:
        with pytest.raises(variants.VariantUnavailable, match="no GPTQ group size"):
            variants._gptq_group_size(ctx)
    else:
        assert variants._gptq_group_size(ctx) == group


def test_a_second_builder_waits_and_finds_the_entry_built():
    """Two processes building one entry (two runs, two test workers) build it once."""
    entry = cache.entry_dir("models", "m")
    script = (
        "import sys, time\n"
        "from qspec import cache\n"
        "entry = cache.entry_dir('models', 'm')\n"
        "with cache.building(entry) as missing:\n"
        "    print('missing' if missing else 'found', flush=True)\n"
        "    if missing:\n"
        "        time.sleep(1.5)\n"
        "        with cache.atomic_dir(entry) as tmp:\n"
        "            (tmp / cache.SOURCE).write_text('{}')\n"
    )
    env = {**os.environ}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said == ["found", "missing"]
    assert (entry / cache.SOURCE).exists()
    assert [e.name for e in cache.entries()] == ["m"]  # the lock file is not an entry

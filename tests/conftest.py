"""Shared fixtures: tiny random Llama models (fast) and the real default model (slow tests)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# The files that take longest, first: `nox -s tests` runs two pytest-xdist workers a file at
# a time (--dist loadfile), and a long file started last would run alone at the end.
LONGEST_FIRST = ("test_serving_live", "test_default_model", "test_reference_loop", "test_ray")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable within


def tiny_llama(
    seed: int, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4, **config
) -> LlamaForCausalLM:
    """A random Llama; `config` overrides LlamaConfig fields (token ids, positions, kv heads)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cfg = LlamaConfig(**{**fields, **config})
    model = LlamaForCausalLM(cfg).eval()
    with (
        torch.no_grad()
    ):  # sharper distributions than the default init, so greedy paths are not ties
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def target_model():
    return tiny_llama(0)


@pytest.fixture(scope="session")
def draft_model():
    return tiny_llama(1)


@pytest.fixture(scope="session")
def default_model_dir():
    """The real SmolLM2-135M-Instruct, converted once from the packaged GGUF into the cache."""
    from qspec.models.refs import gguf_path, resolve

    try:
        gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return resolve("smollm2-135m-instruct").location


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    """A tiny random Llama saved with the real SmolLM2 tokenizer: a local model ref that loads in ms."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = tiny_llama(3, vocab=len(tok), hidden=64, layers=2)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_config(path, model_dir, **overrides) -> str:
    """A small TOML config for a tiny-model run; overrides are top-level TOML snippets."""
    import json

    body = {
        "gammas": "[2]",
        "modes": '["greedy", "sample"]',
        "max_new_tokens": "8",
        "max_prompts": "2",
        "warmup": "0",
        "suites": '["example-custom"]',
        "hf_assisted_modes": '["greedy", "sample"]',
        "hf_assisted_targets": '"all"',
        "sampled_targets": '"all"',
        # the served engine has tests of its own (test_serving_live.py): tiny runs stay in-process
        "engines": '["qspec"]',
        **{k: v for k, v in overrides.items() if not k.startswith("_")},
    }
    lines = [f"{k} = {v}" for k, v in body.items()]
    lines += [
        "[target]",
        f"ref = {json.dumps(str(model_dir))}",
        overrides.get("_target", 'precisions = ["fp32", "nf4"]'),
        "[draft]",
        f"ref = {json.dumps(str(model_dir))}",
        overrides.get("_draft", 'precisions = ["nf4", "ngram"]'),
        "[quality]",
        "max_tokens = 64",
        "window = 32",
        "stride = 16",
        overrides.get("_quality", ""),
        "[tasks]",
        overrides.get("_tasks", "enabled = false"),
        "[vllm]",
        overrides.get("_vllm", ""),
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def greedy_fp32_run(tmp_path, model_dir):
    """A loaded config and its suites for a small fp32-target, greedy, target-only-baseline run."""
    from qspec.config import load_config
    from qspec.suites.discovery import load_suite

    cfg = load_config(
        write_config(
            tmp_path / "c.toml",
            model_dir,
            modes='["greedy"]',
            baselines='["target_only"]',
            _target='precisions = ["fp32"]',
        )
    )
    return cfg, [load_suite(name) for name in cfg.suites]

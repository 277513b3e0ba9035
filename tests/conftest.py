"""Shared fixtures: tiny random Llama models (fast) and the real default model (slow tests)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def tiny_llama(seed: int, vocab: int = 64, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
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
    from qspec.models import gguf_path, resolve

    try:
        gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return resolve("smollm2-135m-instruct").location

"""Layer-skip self-drafts: the target's own weights with layers left out, still lossless."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import ModelDrafter
from qspec.engine.layerskip import LayerSkip, middle_layers
from qspec.engine.loop import generate
from qspec.measure.acceptance import Acceptance
from qspec.measure.skip_search import search_skip

PROMPT = torch.tensor([3, 7, 11, 5, 2, 9, 4, 8, 6, 10])


@pytest.fixture(scope="module")
def deep():
    return tiny_llama(5, layers=6)


def test_middle_layers_are_evenly_spaced_and_keep_the_ends():
    assert middle_layers(30, 0.5) == (1, 3, 5, 7, 9, 11, 13, 15, 16, 18, 20, 22, 24, 26, 28)
    assert middle_layers(6, 0.5) == (1, 3, 4)
    assert middle_layers(2, 0.5) == ()


def test_skipping_nothing_is_the_model_itself(deep):
    ids = PROMPT.view(1, -1)
    same = LayerSkip(deep, ())(input_ids=ids, use_cache=False).logits
    assert torch.equal(same, deep(input_ids=ids, use_cache=False).logits)
    # and the wrapped model is left whole for the target's own forwards
    LayerSkip(deep, (1, 2))(input_ids=ids, use_cache=False)
    assert len(deep.get_decoder().layers) == 6


@pytest.mark.parametrize("gamma", [1, 3])
def test_a_layer_skip_draft_is_lossless_and_caches_only_its_layers(deep, gamma):
    plain = generate(deep, PROMPT, max_new_tokens=30)
    drafter = ModelDrafter(LayerSkip(deep, (2,)))
    spec = generate(
        deep, PROMPT, drafter=drafter, length=DraftLength(gamma=gamma), max_new_tokens=30
    )
    assert spec.tokens == plain.tokens
    stats = Acceptance.of(spec.steps, gamma).fields()
    assert stats["drafted"] > 0 and 0 < stats["acceptance_rate"] <= 1
    layers = drafter.kv.cache.layers
    filled = [i for i, layer in enumerate(layers) if layer.is_initialized]
    assert filled == [0, 1, 3, 4, 5]  # the skipped layer never allocates keys and values


def test_bad_skip_sets_are_refused(deep):
    with pytest.raises(ValueError, match="does not exist"):
        LayerSkip(deep, (6,))
    with pytest.raises(ValueError, match="at least one layer"):
        LayerSkip(deep, tuple(range(6)))


def test_search_removes_layers_greedily_and_picks_the_best_round(deep):
    ids = torch.randint(2, 64, (80,), generator=torch.Generator().manual_seed(0))
    found = search_skip(deep, ids, gamma=3, max_skipped=3)
    rounds = found["rounds"]
    assert 1 <= len(rounds) <= 3
    for i, r in enumerate(rounds):  # each round skips one layer more than the last
        assert len(r["skip"]) == i + 1 and set(rounds[i - 1]["skip"]) <= set(r["skip"]) or i == 0
        assert 0.3 <= r["alpha"] <= 1 and r["cost_ratio"] > 0
    best = max(rounds, key=lambda r: r["speedup_predicted"])
    assert found["skip"] == best["skip"]


def test_layer_skip_drafts_in_a_run(tmp_path, tiny_model_dir):
    """skip-50% drafts from each cell's own target; nf4+skip-search from the nf4 variant."""
    from conftest import write_config

    from qspec import store
    from qspec.cli import main

    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        modes='["greedy"]',
        hf_assisted_targets='"reference"',
        _draft='precisions = ["skip-50%", "nf4+skip-search"]',
    )
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    recs = store.read(out / "results.jsonl")
    spec = {(r["target"], r["draft"]): r for r in recs if r["kind"] == "speculative"}
    assert set(spec) == {(t, d) for t in ("fp32", "nf4") for d in ("skip-50%", "nf4+skip-search")}
    for r in spec.values():
        assert r["status"] == "ok" and r["lossless"] is True
        assert isinstance(r["draft_skip"], list) and r["replay_exact"] is True
    # a 2-layer model has no middle layer for skip-50% to leave out
    assert spec[("fp32", "skip-50%")]["draft_skip"] == []
    # no second model: a target's skip draft adds no weights to the cell
    assert (
        spec[("fp32", "skip-50%")]["peak_memory_bytes"]
        < spec[("fp32", "nf4+skip-search")]["peak_memory_bytes"]
    )
    peers = [r for r in recs if r["kind"] == "hf_assisted"]
    assert peers and all(r["status"] == "unavailable" for r in peers)

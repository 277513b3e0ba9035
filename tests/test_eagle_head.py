"""EAGLE-3 heads on tiny random llamas: the cache, the training-time-test unroll, checkpoints
in both vLLM layouts, the target checks, and deterministic training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from qspec.engine.eagle_head import EagleHead, HeadConfig
from qspec.models.eagle_checkpoint import head_problems, load_head, read_config, save_head
from qspec.models.eagle_training import collect, init_head, train_head, unroll

AUX = (1, 2, 3)  # 3: the residual stream after the last layer (pre-norm), as vLLM allows


@pytest.fixture(scope="module")
def target():
    return tiny_llama(5, vocab=96, hidden=32, layers=3, heads=4)


def sequences(n: int, length: int, vocab: int = 96, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def random_head(target, draft_vocab: int = 40, seed: int = 1) -> EagleHead:
    cfg = HeadConfig.from_target(target.config, draft_vocab, AUX)
    draft_ids = torch.randperm(96, generator=torch.Generator().manual_seed(seed))[:draft_vocab]
    feats = collect(target, sequences(2, 16, seed=seed), AUX)
    head = init_head(target, cfg, draft_ids.sort().values, seed, feats)
    with torch.no_grad():  # move off the fitted init so that every weight matters
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return head.eval()


def test_cache_rollback_matches_recompute(target):
    head = random_head(target)
    torch.manual_seed(0)
    ids, states = torch.randint(0, 96, (10,)), torch.randn(10, 32)
    pos = torch.arange(10)
    with torch.no_grad():
        full, _ = head(ids, states, pos, head.new_cache(16))
        cache = head.new_cache(16)
        head(ids[:6], states[:6], pos[:6], cache)
        head(torch.randint(0, 96, (3,)), torch.randn(3, 32), pos[6:9], cache)  # rejected drafts
        cache.rollback(6)
        again, _ = head(ids[6:], states[6:], pos[6:], cache)
    assert torch.allclose(again, full[6:], atol=1e-5)
    outside = torch.ones(96, dtype=torch.bool)
    outside[head.draft_ids()] = False
    assert torch.isinf(full[:, outside]).all() and torch.isfinite(full[:, ~outside]).all()


def test_unroll_is_what_drafting_computes(target):
    """Step k of the training-time-test unroll at p = t + k - 1 equals drafting from t through
    the cache: target states up to t, then the head's own states, fed the same tokens."""
    head = random_head(target)
    ids = torch.tensor(sequences(1, 12)[0])
    feats = collect(target, [ids.tolist()], AUX)
    with torch.no_grad():
        logits = unroll(head, ids, feats.aux[0], 3)
        t = 6
        cache = head.new_cache(16)
        fused = head.fuse(feats.aux[0][: t + 1])
        out, state = head(ids[1 : t + 2], fused, torch.arange(t + 1), cache)
        state = state[-1:]
        for k in range(2, 4):
            p = t + k - 1
            out, state = head(ids[p + 1 : p + 2], state, torch.tensor([p]), cache)
            assert torch.allclose(head.to_target(logits[k - 1][p : p + 1]), out, atol=1e-4)


@pytest.mark.parametrize("layout", ["eagle3", "speculators"])
@pytest.mark.parametrize("draft_vocab", [40, 96])
def test_save_load_same_logits(target, tmp_path, layout, draft_vocab):
    head = random_head(target, draft_vocab)
    save_head(head, tmp_path, {"name_or_path": "tiny"}, layout=layout)
    config = read_config(tmp_path)
    assert ("speculators_model_type" in config) == (layout == "speculators")
    back = load_head(tmp_path, target)
    ids, states, pos = torch.randint(0, 96, (7,)), torch.randn(7, 32), torch.arange(7)
    with torch.no_grad():
        a, sa = head(ids, states, pos, head.new_cache(8))
        b, sb = back(ids, states, pos, back.new_cache(8))
    assert torch.equal(a, b) and torch.equal(sa, sb)


def test_head_problems_name_the_mismatch(target, tmp_path):
    save_head(random_head(target), tmp_path, {"name_or_path": "tiny"})
    config = read_config(tmp_path)
    assert head_problems(config, target) == []
    wrong = tiny_llama(6, vocab=80, hidden=48, layers=2, heads=4)
    problems = head_problems(config, wrong)
    assert any(p.startswith("hidden_size: head has 32, target has 48") for p in problems)
    assert any(p.startswith("vocab_size: head has 96, target has 80") for p in problems)
    assert any(p.startswith("eagle_aux_hidden_state_layer_ids") for p in problems)
    with pytest.raises(ValueError, match="hidden_size"):
        load_head(tmp_path, wrong)
    speculators = tmp_path / "s"
    save_head(random_head(target), speculators, {"name_or_path": "tiny"}, layout="speculators")
    spec = json.loads((speculators / "config.json").read_text())
    assert any("transformer_layer_config.vocab_size" in p for p in head_problems(spec, wrong))


def train(target, seed=0, steps=4):
    train, held = sequences(3, 24), sequences(1, 24, seed=9)
    return train_head(
        target,
        train,
        held,
        seed=seed,
        max_seconds=60,
        max_steps=steps,
        draft_vocab_size=40,
        unroll=2,
        lr=3e-3,
        warmup=1,
    )


def test_training_is_deterministic_and_learns(target):
    head_a, report = train(target, steps=12)
    head_b, _ = train(target, steps=12)
    b = head_b.state_dict()
    for name, a in head_a.state_dict().items():
        assert torch.equal(a, b[name]), name
    assert report["steps"] == 12 and report["a_1_n"] > 0
    assert report["heldout_loss"] < report["before"]["heldout_loss"]
    head_c, _ = train(target, seed=1, steps=12)
    q = head_a.midlayer.self_attn.q_proj.weight
    assert not torch.equal(q, head_c.midlayer.self_attn.q_proj.weight)

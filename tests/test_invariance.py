"""Batch invariance is measured, not assumed: an fp32 target passes, a shape-dependent one
is caught, and a greedy mismatch is traced to its first position and the target's margin."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from qspec.engine.loop import generate
from qspec.measure.invariance import batch_invariance, divergence, first_mismatch


def _ids(n: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_fp32_tiny_model_is_batch_invariant(target_model):
    r = batch_invariance(target_model, _ids(80), k=4)
    assert r.positions == 64 and r.k == 4
    assert r.argmax_flips == 0 and r.argmax_flips_per_1000 == 0
    assert r.batch_invariant is True
    assert r.max_abs_logit_diff < 1e-3
    assert r.max_flip_margin is None
    assert "one token per forward" in r.method


def test_shape_dependent_model_is_caught():
    """A final norm whose output moves when the forward holds more than one row."""
    model = tiny_llama(5)
    bump = 3.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    hook = model.model.norm.register_forward_hook(
        lambda m, i, out: out + (out.shape[-2] > 1) * bump
    )
    try:
        r = batch_invariance(model, _ids(80), k=4, max_positions=32)
    finally:
        hook.remove()
    assert r.positions == 32
    assert r.argmax_flips > 0 and r.batch_invariant is False
    assert r.argmax_flips_per_1000 == 1000 * r.argmax_flips / 32
    assert r.max_abs_logit_diff > 1.0 and r.max_flip_margin > 0


def test_short_input_is_refused(target_model):
    with pytest.raises(ValueError):
        batch_invariance(target_model, _ids(3), k=4)


def test_first_mismatch():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2], [1, 2, 3]) == 2


def test_divergence_finds_position_and_margin(target_model):
    prompt = _ids(10, seed=3)
    target = generate(target_model, prompt, max_new_tokens=12).tokens
    assert divergence(target, list(target), target_model, prompt) is None
    at = 5
    logits = target_model(torch.cat([prompt, torch.tensor(target[:at])]).view(1, -1)).logits[0, -1]
    top = logits.topk(2)
    assert top.indices[0].item() == target[at]
    spec = [*target[:at], top.indices[1].item(), *target[at + 1 :]]
    d = divergence(target, spec, target_model, prompt)
    assert d.position == at
    assert d.target_token == target[at] and d.speculative_token == spec[at]
    margin = (top.values[0] - top.values[1]).item()
    assert d.top1_top2_margin == pytest.approx(margin, abs=1e-4)
    assert d.speculative_gap == pytest.approx(margin, abs=1e-4)
    ended = divergence(target, target[:at], target_model, prompt)
    assert ended.position == at and ended.speculative_token is None


@pytest.mark.slow
def test_default_model_variants(default_model_dir):
    """fp32 is batch-invariant on suite text; int8 (threshold 6), int8-t0 and nf4 are measured,
    and int8-t0 generates."""
    from transformers import AutoTokenizer

    from qspec.measure.teacher_forced import tokenize_corpus
    from qspec.models.builders import BuildContext, build
    from qspec.suites.discovery import load_suite

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = torch.tensor(tokenize_corpus(tok, load_suite("default").corpus(), 160)[0])
    figures = {}
    for precision in ("fp32", "int8", "int8-t0", "nf4"):
        model = build(precision, BuildContext(default_model_dir, "cpu"))
        figures[precision] = batch_invariance(model, ids, k=4, max_positions=64)
        if precision == "int8-t0":
            assert len(generate(model, ids[:16], max_new_tokens=8).tokens) == 8
        del model
    for precision, r in figures.items():
        print(precision, r.model_dump(exclude={"method"}))
    assert figures["fp32"].batch_invariant is True
    assert all(r.positions == 64 for r in figures.values())

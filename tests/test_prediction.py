"""Acceptance predicted per step for drafters whose steps vary, against what the engine does."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import ModelDrafter, NgramDrafter
from qspec.engine.loop import Step, generate
from qspec.engine.sampling import sampler_for
from qspec.measure.acceptance import Acceptance, expected_tau
from qspec.measure.prediction import on_policy_beta, sampled_odds
from qspec.measure.step_odds import DraftOdds, Expected, expected_run

# repeats itself, so lookup finds matches at some positions and none at others
PROMPT = torch.tensor([0, 5, 9, 12, 5, 9, 30, 7, 5, 9, 12, 40, 41, 5, 9])


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return tiny_llama(21, vocab=48, hidden=32, layers=2)


def test_certain_odds_walk_the_steps_a_replay_takes():
    """With odds of 0 and 1 the expected run is one path: the steps themselves."""
    steps = [Step(3, 3, 4, 0, 0), Step(0, 0, 1, 0, 0), Step(2, 1, 2, 0, 0), Step(3, 0, 1, 0, 0)]
    n_tokens = 1 + sum(s.emitted for s in steps)
    accept, stop, t = [[]] * n_tokens, [[1.0]] * n_tokens, 1
    for s in steps:
        accept[t] = [1.0] * s.accepted + [0.0] * (s.drafted - s.accepted)
        stop[t] = [0.0] * s.drafted + [1.0]
        t += s.emitted
    run = expected_run(DraftOdds(accept, stop), n_tokens, DraftLength(gamma=3), 100)
    assert run == Expected.of_steps(steps, 3)
    assert run.fields()["tau_predicted"] == Acceptance.of(steps, 3).tau


def test_independent_odds_approach_leviathans_tau():
    odds = DraftOdds([[0.6] * 4] * 3000, [[0.0] * 4] * 3000)
    run = expected_run(odds, 3000, DraftLength(gamma=4), 10**6)
    assert run.tokens / run.steps == pytest.approx(expected_tau(0.6, 4), rel=2e-3)
    assert run.fields()["position_acceptance_predicted"] == pytest.approx([0.6] * 4)


def test_sampled_lookup_is_predicted_per_step(target):
    """Sampled n-gram lookup: the expected steps over each output (a match continued across
    the step, no draft where nothing matches) against the steps the engine took, summed over
    many generations. Leviathan's formula from the first draft's acceptance misses them."""
    sampler, length = sampler_for("sample", temperature=0.5), DraftLength(gamma=3)
    measured, predicted, leviathan = 0, 0.0, 0.0
    for seed in range(60):
        rng = torch.Generator().manual_seed(seed)
        make = lambda: NgramDrafter(max_ngram=2, min_ngram=1)  # noqa: E731
        gen = generate(
            target, PROMPT, drafter=make(), length=length, sampler=sampler,
            max_new_tokens=20, generator=rng,
        )  # fmt: skip
        ids = torch.cat([PROMPT, torch.tensor(gen.tokens)])
        start = PROMPT.numel() + 1
        odds = sampled_odds(target, make(), ids, start, sampler, length, [])
        predicted += expected_run(odds, len(gen.tokens), length, 20).steps
        measured += len(gen.steps)
        betas = on_policy_beta(target, make(), ids, start, sampler).tolist()
        if betas:
            alpha = sum(betas) / len(betas)
            leviathan += (len(gen.tokens) - 1) / expected_tau(alpha, length.gamma)
    assert predicted == pytest.approx(measured, rel=0.08)
    assert abs(leviathan - measured) > 2 * abs(predicted - measured)


def test_the_heuristic_schedule_is_counted_to_twice_gamma(target):
    """Its budget grows to 2 gamma: the histogram and per-position rates reach that far."""
    draft = tiny_llama(22, vocab=48, hidden=32, layers=2)
    with torch.no_grad():  # a draft close to the target: full accepts, so the budget grows
        for a, b in zip(draft.parameters(), target.parameters(), strict=True):
            a.copy_(b + 1e-3 * torch.randn_like(b))
    length = DraftLength("heuristic", gamma=2)
    gen = generate(target, PROMPT, drafter=ModelDrafter(draft), length=length, max_new_tokens=30)
    assert max(s.drafted for s in gen.steps) > length.gamma
    measured = Acceptance.of(gen.steps, length.widest)
    assert len(measured.histogram) == length.widest + 1
    assert sum(measured.position_tested[length.gamma :]) > 0

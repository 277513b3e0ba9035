"""Speculative sampling must emit exactly the target's distribution (Leviathan et al. 2023, Thm 1).

A tiny model with a 6-token vocabulary makes the exact distribution of the first two
emitted tokens computable, so a chi-square test with a fixed seed can compare it with
the empirical distribution from many speculative generations.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from scipy.stats import chisquare

from qspec.drafters import ModelDrafter, NgramDrafter
from qspec.engine import generate
from qspec.sampling import Sampler, sampler_for

VOCAB = 6
PROMPT = torch.tensor([0, 3, 2, 4])
TRIALS = 3000
P_MIN = 1e-3  # the test fails when the sample is this unlikely under the target's own distribution


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    target = tiny_llama(10, vocab=VOCAB, hidden=16, layers=1)
    draft = tiny_llama(11, vocab=VOCAB, hidden=16, layers=1)
    return target, draft


def exact_pair_distribution(target, sampler: Sampler) -> torch.Tensor:
    """P(t1, t2) = p(t1 | prompt) * p(t2 | prompt, t1) under the sampler's transform."""
    with torch.inference_mode():
        first = sampler.probs(target(PROMPT.view(1, -1)).logits[0, -1])
        table = torch.zeros(VOCAB, VOCAB)
        for t1 in range(VOCAB):
            ids = torch.cat([PROMPT, torch.tensor([t1])]).view(1, -1)
            table[t1] = first[t1] * sampler.probs(target(ids).logits[0, -1])
    return table.flatten()


def empirical_pairs(target, make_drafter, sampler, accept=None) -> torch.Tensor:
    counts = torch.zeros(VOCAB * VOCAB)
    rng = torch.Generator().manual_seed(1234)
    for _ in range(TRIALS):
        gen = generate(
            target,
            PROMPT,
            drafter=make_drafter(),
            gamma=3,
            sampler=sampler,
            max_new_tokens=2,
            generator=rng,
            accept=accept,
        )
        counts[gen.tokens[0] * VOCAB + gen.tokens[1]] += 1
    return counts


def chi_square_p(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pool cells with expected count < 5 into one, as the chi-square approximation needs."""
    expected = expected_probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert counts[expected_probs == 0].sum() == 0, "emitted a token the target gives probability 0"
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


SAMPLERS = {
    "temperature": sampler_for("sample", temperature=1.3),
    "top_k": sampler_for("sample", temperature=1.0, top_k=3),
    "top_p": sampler_for("sample", temperature=0.9, top_p=0.8),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_speculative_sampling_matches_target_distribution(models, name):
    target, draft = models
    sampler = SAMPLERS[name]
    counts = empirical_pairs(target, lambda: ModelDrafter(draft), sampler)
    assert chi_square_p(counts, exact_pair_distribution(target, sampler)) > P_MIN


def test_ngram_drafts_are_corrected_to_target_distribution(models):
    """A deterministic drafter (q one-hot) must be corrected just the same."""
    target, _ = models
    sampler = SAMPLERS["temperature"]
    counts = empirical_pairs(target, lambda: NgramDrafter(max_ngram=1), sampler)
    assert chi_square_p(counts, exact_pair_distribution(target, sampler)) > P_MIN


def broken_accept(target_logits, draft_ids, draft_probs, sampler, generator):
    """A plausible bug: on rejection draw from p instead of the residual max(0, p - q)."""
    p = sampler.probs(target_logits)
    k = draft_ids.numel()
    if k == 0:
        return 0, torch.multinomial(p[0], 1, generator=generator)[0]
    rows = torch.arange(k)
    r = torch.rand(k, generator=generator)
    ok = (r * draft_probs[rows, draft_ids] <= p[rows, draft_ids]).int()
    n = int(ok.cumprod(0).sum())
    return n, torch.multinomial(p[n], 1, generator=generator)[0]


def test_a_broken_acceptance_rule_fails_the_same_test(models):
    target, draft = models
    sampler = SAMPLERS["temperature"]
    counts = empirical_pairs(target, lambda: ModelDrafter(draft), sampler, accept=broken_accept)
    assert chi_square_p(counts, exact_pair_distribution(target, sampler)) < P_MIN

"""Speculative sampling must emit exactly the target's distribution (Leviathan et al. 2023, Thm 1).

A tiny model with a 6-token vocabulary makes the exact joint distribution of the two
tokens after the first (those of the first speculative step) computable, so a chi-square test with a fixed seed can compare it with
the empirical distribution from many speculative generations.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from scipy.stats import chisquare

from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import ModelDrafter, NgramDrafter
from qspec.engine.loop import generate
from qspec.engine.sampling import Sampler, sampler_for

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
    """P(t2, t3) = sum over t1 of p(t1) p(t2 | t1) p(t3 | t1, t2) under the sampler's transform.

    The first token comes from the prefill; tokens 2 and 3 come from the first speculative
    step (a draft, then the bonus token or the correction), so their joint law is the test.
    """

    def probs(*tokens: int) -> torch.Tensor:
        ids = torch.cat([PROMPT, torch.tensor(tokens, dtype=PROMPT.dtype)]).view(1, -1)
        return sampler.probs(target(ids).logits[0, -1])

    table = torch.zeros(VOCAB, VOCAB)
    with torch.inference_mode():
        first = probs()
        for t1 in range(VOCAB):
            second = probs(t1)
            for t2 in range(VOCAB):
                table[t2] += first[t1] * second[t2] * probs(t1, t2)
    return table.flatten()


def empirical_pairs(target, make_drafter, sampler, accept=None) -> torch.Tensor:
    counts = torch.zeros(VOCAB * VOCAB)
    rng = torch.Generator().manual_seed(1234)
    for _ in range(TRIALS):
        gen = generate(
            target,
            PROMPT,
            drafter=make_drafter(),
            length=DraftLength(gamma=3),
            sampler=sampler,
            max_new_tokens=3,
            generator=rng,
            accept=accept,
        )
        counts[gen.tokens[1] * VOCAB + gen.tokens[2]] += 1
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
        return torch.tensor(0), torch.multinomial(p[0], 1, generator=generator)
    rows = torch.arange(k)
    r = torch.rand(k, generator=generator)
    n = (r * draft_probs[rows, draft_ids] <= p[rows, draft_ids]).int().cumprod(0).sum()
    nxt = torch.multinomial(p[n], 1, generator=generator)
    out = torch.cat([draft_ids, nxt])
    out[n] = nxt[0]
    return n, out


def test_a_broken_acceptance_rule_fails_the_same_test(models):
    target, draft = models
    sampler = SAMPLERS["temperature"]
    counts = empirical_pairs(target, lambda: ModelDrafter(draft), sampler, accept=broken_accept)
    assert chi_square_p(counts, exact_pair_distribution(target, sampler)) < P_MIN


def test_a_draft_the_target_rules_out_is_rejected_even_when_r_is_zero(monkeypatch):
    """Accept iff r * q(x) < p(x): with p(x) = 0 no draw of r, not even 0, accepts x."""
    from qspec.engine.accept import accept_sample

    sampler = sampler_for("sample", top_k=1)  # p is one-hot on the largest logit
    logits = torch.tensor([[4.0, 1.0, 0.0], [0.0, 4.0, 1.0]])
    draft = torch.tensor([2])  # outside the target's top-1: p(draft) = 0
    q = torch.tensor([[0.0, 0.0, 1.0]])
    monkeypatch.setattr(torch, "rand", lambda k, **kw: torch.zeros(k))
    n, out = accept_sample(logits, draft, q, sampler, None)
    assert int(n) == 0 and int(out[0]) == 0  # rejected, corrected to the target's own token

"""An independent check of the speculative engine against a naive reference loop.

The reference is written from the definition of greedy speculative decoding (docs/definitions.md):
the prefill gives the first token; each step the drafter proposes up to gamma tokens,
the target scores the last token plus all drafts, the longest prefix of drafts that
each equal the target's argmax is accepted, and one more token comes from the target.
It keeps no KV cache and rolls nothing back: EVERY forward, of the target and of a
draft model, is a fresh full forward over the whole sequence (`use_cache=False`). The
engine (pre-allocated caches rolled back by a pointer, acceptance on the device) must
produce the same tokens and the same per-step drafted / accepted / emitted counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import ModelDrafter, NgramDrafter
from qspec.engine.loop import generate
from qspec.engine.sampling import GREEDY

Propose = Callable[[list[int], int], list[int]]


@dataclass
class RefStep:
    drafted: int
    accepted: int
    emitted: int


@dataclass
class RefGeneration:
    tokens: list[int]
    steps: list[RefStep]


@torch.no_grad()
def full_logits(model, seq: list[int]) -> torch.Tensor:
    """(len(seq), V) logits of one fresh forward over the whole sequence: no cache at all."""
    device = next(model.parameters()).device
    ids = torch.tensor([seq], dtype=torch.long, device=device)
    return model(input_ids=ids, use_cache=False).logits[0].float()


def model_proposer(draft) -> Propose:
    """Draft token i is the argmax of a full forward of the draft over prefix + drafts[:i]."""

    def propose(seq: list[int], budget: int) -> list[int]:
        drafts: list[int] = []
        for _ in range(budget):
            drafts.append(int(full_logits(draft, seq + drafts)[-1].argmax()))
        return drafts

    return propose


def ngram_proposer(max_ngram: int = 3, min_ngram: int = 1) -> Propose:
    """Prompt lookup: for n = max_ngram .. min_ngram, find the latest EARLIER occurrence of
    the sequence's last n tokens and copy up to `budget` tokens that followed it.

    The tie rules (longest n first; among occurrences the latest start whose copy has at
    least one token, i.e. start <= len(seq) - n - 1, so the suffix never matches itself;
    n capped at len(seq) - 1; the copy may be shorter than the budget) are copied from
    NgramDrafter.propose on purpose, so this check covers the engine, not the lookup rule.
    """

    def propose(seq: list[int], budget: int) -> list[int]:
        for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
            tail = seq[len(seq) - n :]
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    return seq[start + n : start + n + budget]
        return []

    return propose


def reference_generate(
    target,
    prompt: list[int],
    propose: Propose | None,
    gamma: int,
    max_new_tokens: int,
    eos_ids: frozenset[int] = frozenset(),
) -> RefGeneration:
    """Greedy speculative decoding, every forward recomputed from scratch."""
    if propose is None:
        gamma = 0
    first = int(full_logits(target, prompt)[-1].argmax())  # the prefill gives the first token
    tokens, steps = [first], []
    stop = first in eos_ids
    while not stop and len(tokens) < max_new_tokens:
        seq = prompt + tokens
        # the engine's per-step budget: a step never drafts past the token limit, bonus included
        budget = min(gamma, max_new_tokens - len(tokens) - 1)
        drafts = propose(seq, budget) if budget > 0 else []
        # the target scores the last token plus all drafts: row j predicts the token after
        # seq + drafts[:j], for j = 0 .. len(drafts)
        rows = full_logits(target, seq + drafts)[len(seq) - 1 :]
        best = [int(t) for t in rows.argmax(-1)]
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == best[accepted]:
            accepted += 1
        # accepted drafts, then the target's own token (correction or bonus)
        emitted = drafts[:accepted] + [best[accepted]]
        drafted = len(drafts)
        hit = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
        if hit is not None:  # keep up to the first EOS; the engine counts only what is kept
            emitted = emitted[: hit + 1]
            if hit < accepted:  # EOS was an accepted draft: the drafts after it were not needed
                drafted = accepted = hit + 1
            stop = True
        steps.append(RefStep(drafted, accepted, len(emitted)))
        tokens += emitted
    return RefGeneration(tokens, steps)


def engine_steps(gen) -> list[RefStep]:
    return [RefStep(s.drafted, s.accepted, s.emitted) for s in gen.steps]


def assert_same(engine_gen, ref: RefGeneration) -> None:
    got = engine_steps(engine_gen)
    assert [s.drafted for s in got] == [s.drafted for s in ref.steps]
    assert [s.accepted for s in got] == [s.accepted for s in ref.steps]
    assert got == ref.steps
    assert engine_gen.tokens == ref.tokens


# --- tiny random models: fast, every gamma, every kind of drafter -------------------------

TINY_PROMPT = [0, 5, 9, 12, 5, 9, 30, 7, 5, 9]


@pytest.fixture(scope="module")
def near_model(target_model):
    """The tiny target with its weights perturbed: a draft that agrees often but not always
    (the unrelated conftest draft agrees with the target almost never)."""
    model = copy.deepcopy(target_model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    return model


@pytest.fixture
def tiny_drafters(target_model, draft_model, near_model):
    """kind -> (engine drafter, reference proposer)."""
    return {
        "model": lambda: (ModelDrafter(draft_model), model_proposer(draft_model)),
        "near": lambda: (ModelDrafter(near_model), model_proposer(near_model)),
        "self": lambda: (ModelDrafter(target_model), model_proposer(target_model)),
        "ngram": lambda: (NgramDrafter(), ngram_proposer()),
        "ngram2": lambda: (NgramDrafter(max_ngram=2), ngram_proposer(max_ngram=2)),
    }


@pytest.mark.parametrize("gamma", [1, 2, 3, 5])
@pytest.mark.parametrize("max_new_tokens", [17, 30])
@pytest.mark.parametrize("kind", ["model", "near", "self", "ngram", "ngram2"])
def test_tiny_engine_matches_reference(target_model, tiny_drafters, kind, gamma, max_new_tokens):
    drafter, propose = tiny_drafters[kind]()
    gen = generate(
        target_model,
        torch.tensor(TINY_PROMPT),
        drafter=drafter,
        length=DraftLength(gamma=gamma),
        sampler=GREEDY,
        max_new_tokens=max_new_tokens,
    )
    ref = reference_generate(target_model, TINY_PROMPT, propose, gamma, max_new_tokens)
    assert len(ref.tokens) == max_new_tokens
    if kind == "near":  # the case covers steps that accept some drafts and reject the rest
        assert len({s.accepted for s in ref.steps if s.drafted}) > 1
    assert_same(gen, ref)


def test_tiny_plain_decoding_matches_reference(target_model):
    gen = generate(target_model, torch.tensor(TINY_PROMPT), max_new_tokens=20)
    ref = reference_generate(target_model, TINY_PROMPT, None, 0, 20)
    assert all(s == RefStep(0, 0, 1) for s in ref.steps) and len(ref.steps) == 19
    assert_same(gen, ref)


@pytest.mark.parametrize("gamma", [2, 4])
@pytest.mark.parametrize("kind", ["model", "near", "self", "ngram"])
def test_tiny_eos_matches_reference(target_model, tiny_drafters, kind, gamma):
    """A stop token in the middle of a step: both loops keep it, drop what follows, and
    count only what was kept (with the self-draft it is an accepted draft)."""
    plain = reference_generate(target_model, TINY_PROMPT, None, 0, 30).tokens
    at = next(i for i in range(8, 30) if plain[i] not in plain[:i])  # its first occurrence
    eos = frozenset({plain[at]})
    drafter, propose = tiny_drafters[kind]()
    gen = generate(
        target_model,
        torch.tensor(TINY_PROMPT),
        drafter=drafter,
        length=DraftLength(gamma=gamma),
        max_new_tokens=30,
        eos_ids=eos,
    )
    ref = reference_generate(target_model, TINY_PROMPT, propose, gamma, 30, eos)
    assert ref.tokens == plain[: at + 1]
    assert_same(gen, ref)


# --- the real default model (SmolLM2-135M-Instruct): fp32 target, gamma 3, greedy ---------

REAL_PROMPTS = ("code-textwrap-indent", "qa-break")  # a raw code prompt, a chat prompt
REAL_GAMMA = 3
REAL_NEW_TOKENS = 32

# Measured on this machine (AMD EPYC with AVX512-BF16, bitsandbytes 0.50.2, torch 2.13 CPU).
NF4_BF16_REASON = (
    "bitsandbytes' CPU nf4 kernel on AVX512-BF16 machines (Linear4bit repacks its weight on "
    "the first forward, then gemv_4bit rounds activations and outputs to bf16) turns fp32 "
    "rounding differences of ~1e-6 (attention over the static cache vs over the exact "
    "sequence) into logit differences of up to 0.5: on qa-break the nf4 draft's first "
    "proposal (position 221, after the prefill's token) is ' loop' (id 8762) by a margin "
    "of 0.057 with the cache and ' Python' (id 5905) by 0.0029 on full recompute, so the "
    "engine accepts 3 drafts at step 1 and the reference 0. Output tokens are identical. "
    "With bitsandbytes' fp32 path (support_avx512bf16_for_cpu = False) the engine matches "
    "the reference exactly on this prompt."
)


@pytest.fixture(scope="module")
def real(default_model_dir):
    from transformers import AutoTokenizer

    from qspec.models.builders import BuildContext, build
    from qspec.suites.discovery import load_suite
    from qspec.suites.encoding import prompt_ids, stop_ids

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    suite = {p.id: p for p in load_suite("default").prompts}
    target = build("fp32", BuildContext(str(default_model_dir), "cpu"))
    return {
        "target": target,
        "nf4": build("nf4", BuildContext(str(default_model_dir), "cpu")),
        "prompts": {pid: prompt_ids(tok, suite[pid]) for pid in REAL_PROMPTS},
        "eos": stop_ids(tok, target),
    }


def run_both(real, prompt_id: str, drafter, propose):
    ids = real["prompts"][prompt_id]
    gen = generate(
        real["target"],
        torch.tensor(ids),
        drafter=drafter,
        length=DraftLength(gamma=REAL_GAMMA),
        sampler=GREEDY,
        max_new_tokens=REAL_NEW_TOKENS,
        eos_ids=real["eos"],
    )
    ref = reference_generate(real["target"], ids, propose, REAL_GAMMA, REAL_NEW_TOKENS, real["eos"])
    return gen, ref


@pytest.mark.slow
@pytest.mark.parametrize("prompt_id", REAL_PROMPTS)
@pytest.mark.parametrize("kind", ["ngram", "fp32-self"])
def test_real_engine_matches_reference(real, kind, prompt_id):
    if kind == "ngram":
        drafter, propose = NgramDrafter(), ngram_proposer()
    else:  # the fp32 target drafting for itself: fp32 is batch-invariant here (|dlogit| ~4e-5)
        drafter, propose = ModelDrafter(real["target"]), model_proposer(real["target"])
    gen, ref = run_both(real, prompt_id, drafter, propose)
    assert sum(s.drafted for s in ref.steps) > 0
    assert_same(gen, ref)


@pytest.mark.slow
@pytest.mark.parametrize("prompt_id", REAL_PROMPTS)
def test_real_engine_matches_reference_nf4_draft(real, prompt_id, request):
    nf4 = real["nf4"]
    gen, ref = run_both(real, prompt_id, ModelDrafter(nf4), model_proposer(nf4))
    assert sum(s.drafted for s in ref.steps) > 0
    # the fp32 target decides the output whatever the draft proposes
    assert gen.tokens == ref.tokens
    # bitsandbytes repacks a Linear4bit weight for its bf16 CPU kernel on the first forward
    bf16_kernel = any(
        getattr(getattr(m, "weight", None), "quant_state", None) is not None
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in nf4.modules()
    )
    # Measured here: code-textwrap-indent has no nf4 argmax flip between the cached and the
    # full forwards (32 draft forwards, max |dlogit| 0.41; the narrowest top-2 margin, 0.0075
    # at new token 14, happened to hold), so it matches; the bf16 kernel does not promise it.
    # qa-break has one flip (15 draft forwards, max |dlogit| 0.51): see NF4_BF16_REASON.
    # Not strict: whether the flip happens depends on the machine's bf16 rounding (an Intel
    # Xeon with AVX512-BF16 kept the margin and matched).
    if prompt_id == "qa-break" and bf16_kernel:
        request.applymarker(
            pytest.mark.xfail(strict=False, raises=AssertionError, reason=NF4_BF16_REASON)
        )
    assert_same(gen, ref)

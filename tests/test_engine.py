"""The speculative loop: lossless in greedy mode, exact cache rollback, counted acceptance."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_llama

from qspec.engine.compiled import Compiled
from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import ModelDrafter, NgramDrafter
from qspec.engine.loop import Step, generate
from qspec.engine.sampling import sampler_for
from qspec.measure.acceptance import Acceptance

PROMPT = torch.tensor([0, 5, 9, 12, 5, 9, 30, 7, 5, 9])


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("drafter_kind", ["model", "self", "ngram"])
def test_greedy_speculative_output_equals_target_only(
    target_model, draft_model, drafter_kind, gamma
):
    drafter = {
        "model": lambda: ModelDrafter(draft_model),
        "self": lambda: ModelDrafter(target_model),
        "ngram": lambda: NgramDrafter(max_ngram=2),
    }[drafter_kind]()
    plain = generate(target_model, PROMPT, max_new_tokens=40)
    spec = generate(
        target_model, PROMPT, drafter=drafter, length=DraftLength(gamma=gamma), max_new_tokens=40
    )
    assert spec.tokens == plain.tokens
    assert len(spec.tokens) == 40
    assert all(s.emitted == s.accepted + 1 for s in spec.steps)


def test_target_drafting_for_itself_accepts_every_draft(target_model):
    gen = generate(
        target_model,
        PROMPT,
        drafter=ModelDrafter(target_model),
        length=DraftLength(gamma=4),
        max_new_tokens=41,
    )  # the prefill gives the first token, then 8 full steps of 5
    stats = Acceptance.of(gen.steps, 4).fields()
    assert stats["drafted"] > 0
    assert stats["acceptance_rate"] == 1.0 and stats["alpha_measured"] == 1.0
    assert stats["tau"] == 5.0  # 4 drafts + the bonus token per step
    assert stats["accepted_histogram"] == [0, 0, 0, 0, len(gen.steps)]


def test_self_draft_accepts_everything_when_sampling(target_model):
    """q == p: the acceptance test min(1, p/q) always passes."""
    sampler = sampler_for("sample", temperature=0.8, top_k=20, top_p=0.9)
    gen = generate(
        target_model,
        PROMPT,
        drafter=ModelDrafter(target_model),
        length=DraftLength(gamma=3),
        sampler=sampler,
        max_new_tokens=32,
        generator=torch.Generator().manual_seed(0),
    )
    stats = Acceptance.of(gen.steps, 3).fields()
    assert stats["acceptance_rate"] == 1.0


def test_a_different_draft_is_sometimes_rejected(target_model, draft_model):
    gen = generate(
        target_model,
        PROMPT,
        drafter=ModelDrafter(draft_model),
        length=DraftLength(gamma=3),
        max_new_tokens=40,
    )
    stats = Acceptance.of(gen.steps, 3).fields()
    assert 0 <= stats["alpha_measured"] < 1
    assert (
        sum(stats["accepted_histogram"])
        + stats["short_full_accepts"]
        + stats["steps_without_drafts"]
        == stats["steps"]
    )
    # tested = accepted + steps that ended in a rejection
    assert stats["tested"] == stats["accepted"] + sum(
        1 for s in gen.steps if s.accepted < s.drafted
    )


def test_rollback_leaves_caches_holding_exactly_the_emitted_prefix(target_model, draft_model):
    drafter = ModelDrafter(draft_model)
    gen = generate(
        target_model, PROMPT, drafter=drafter, length=DraftLength(gamma=4), max_new_tokens=30
    )
    total = PROMPT.numel() + len(gen.tokens)
    assert drafter.kv.length <= total - 1
    # the target cache holds everything but the last emitted token
    assert gen.target_kv_bytes > 0


def test_stops_at_eos(target_model):
    plain = generate(target_model, PROMPT, max_new_tokens=30)
    eos = plain.tokens[5]
    stop = generate(
        target_model,
        PROMPT,
        drafter=ModelDrafter(target_model),
        length=DraftLength(gamma=4),
        max_new_tokens=30,
        eos_ids=frozenset([eos]),
    )
    assert stop.tokens == plain.tokens[: plain.tokens.index(eos) + 1]


def test_ngram_drafter_copies_what_followed_the_last_match():
    drafter = NgramDrafter(max_ngram=2)
    seq = [1, 2, 3, 4, 9, 2, 3]
    ids, probs = drafter.propose(torch.tensor(seq), 3, None, None, seq)
    assert ids.tolist() == [4, 9, 2] and probs is None
    none, _ = drafter.propose(torch.tensor([1, 2, 3]), 3, None, None, [1, 2, 3])
    assert none.numel() == 0


def test_vocab_sizes_must_match_for_model_drafts():
    small = tiny_llama(2, vocab=48)
    with pytest.raises(Exception):  # noqa: B017 - shape mismatch is refused, not silently broadcast
        generate(
            tiny_llama(0),
            PROMPT,
            drafter=ModelDrafter(small),
            length=DraftLength(gamma=2),
            max_new_tokens=5,
            sampler=sampler_for("sample"),
            generator=torch.Generator().manual_seed(0),
        )


def test_static_cache_decodes_like_transformers_generate(target_model):
    """Pointer rollback and the static mask must give what transformers' own greedy loop gives."""
    ours = generate(target_model, PROMPT, max_new_tokens=30)
    ids = PROMPT.view(1, -1)
    theirs = target_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=30,
        min_new_tokens=30,
        do_sample=False,
    )[0, PROMPT.numel() :].tolist()
    assert ours.kv_path == "static"
    assert ours.tokens == theirs


def test_sliding_window_models_fall_back_to_the_dynamic_cache():
    """A window the static mask does not model must not silently change the output."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
        max_position_embeddings=256,
    )
    model = MistralForCausalLM(cfg).eval()
    gen = generate(
        model, PROMPT, drafter=ModelDrafter(model), length=DraftLength(gamma=3), max_new_tokens=20
    )
    ids = PROMPT.view(1, -1)
    theirs = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20
    )
    assert gen.kv_path == "dynamic"
    assert gen.tokens == theirs[0, PROMPT.numel() :].tolist()


SYNC_METHODS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
}


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_one_host_synchronisation_per_step(target_model, draft_model, mode):
    """Acceptance stays on the device: per step only (n, emitted tokens) come to the host."""
    from torch.overrides import TorchFunctionMode

    class CountSyncs(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += func in SYNC_METHODS
            return func(*args, **(kwargs or {}))

    counter = CountSyncs()
    with counter:
        gen = generate(
            target_model,
            PROMPT,
            drafter=ModelDrafter(draft_model),
            length=DraftLength(gamma=3),
            sampler=sampler_for(mode, temperature=0.8),
            max_new_tokens=30,
            generator=torch.Generator().manual_seed(0),
        )
    # one per step, plus the prefill's first token and the prompt copied once before the loop
    assert counter.count == len(gen.steps) + 2


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler"
)
@pytest.mark.parametrize("drafter_kind", ["none", "model", "ngram"])
def test_compiled_steps_give_the_same_tokens(target_model, draft_model, drafter_kind):
    """torch.compile (inductor on CPU) of the draft and verify steps is lossless too."""
    drafter = {
        "none": lambda: None,
        "model": lambda: ModelDrafter(draft_model, compiled=draft_compiled),
        "ngram": lambda: NgramDrafter(max_ngram=2),
    }[drafter_kind]
    # the caller's compile decision: one Compiled per model, reused by every generation
    target_compiled, draft_compiled = Compiled(target_model), Compiled(draft_model)
    plain = generate(target_model, PROMPT, max_new_tokens=30)
    for _ in range(2):  # the second run reuses the pooled cache and the compiled graphs
        gen = generate(
            target_model,
            PROMPT,
            drafter=drafter(),
            length=DraftLength(gamma=3),
            max_new_tokens=30,
            compiled=target_compiled,
        )
        assert gen.kv_path == "static"
        assert gen.tokens == plain.tokens


def test_eos_among_accepted_drafts_counts_only_the_kept_tokens(target_model):
    """The last step's record must not count drafts accepted after the EOS that ends the output."""
    plain = generate(target_model, PROMPT, max_new_tokens=20)
    # a token the self-draft accepts as its 2nd draft of the first step (not the bonus token)
    eos = plain.tokens[2]
    assert eos not in plain.tokens[:2]
    gen = generate(
        target_model,
        PROMPT,
        drafter=ModelDrafter(target_model),
        length=DraftLength(gamma=4),
        max_new_tokens=20,
        eos_ids=frozenset([eos]),
    )
    assert gen.tokens == plain.tokens[:3]
    assert sum(s.emitted for s in gen.steps) == len(gen.tokens) - 1  # the prefill gave one
    last = gen.steps[-1]
    assert (last.drafted, last.accepted, last.emitted) == (2, 2, 2)
    stats = Acceptance.of(gen.steps, 4).fields()
    assert stats["tested"] == stats["accepted"] == 2 and stats["short_full_accepts"] == 1


def test_a_short_full_accept_is_not_a_rejection():
    steps = [Step(3, 1, 2, 0, 0), Step(2, 2, 3, 0, 0), Step(3, 3, 4, 0, 0), Step(0, 0, 1, 0, 0)]
    stats = Acceptance.of(steps, 3).fields()
    assert stats["accepted_histogram"] == [0, 1, 0, 1]
    assert stats["short_full_accepts"] == 1 and stats["steps_without_drafts"] == 1
    assert stats["tested"] == 6 + 1  # one step ended in a rejection
    # vLLM's unconditional rate divides by drafting steps; the conditional one by tested drafts
    assert stats["position_acceptance_unconditional"] == [1.0, 2 / 3, 1 / 3]
    assert stats["position_acceptance"] == [1.0, 2 / 3, 1.0]
    low, high = stats["alpha_measured_ci95"]
    assert low < 6 / 7 < high <= 1
    assert stats["tau"] == 2.5 and stats["tau_se"] > 0


def test_the_draft_reads_the_prompt_before_the_first_step(target_model, draft_model):
    """The draft's prompt forward is timed apart, so the first step's draft time is a step's;
    it also takes the target's first token, so no draft forward is spent twice: one prefill
    plus one forward per drafted token, less the one the prefill's logits already gave."""
    drafter = ModelDrafter(draft_model)
    drafter.prefill(PROMPT, 64)
    assert drafter.kv.length == PROMPT.numel()
    calls = []
    hook = draft_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        gen = generate(
            target_model,
            PROMPT,
            drafter=ModelDrafter(draft_model),
            length=DraftLength(gamma=3),
            max_new_tokens=12,
        )
    finally:
        hook.remove()
    assert gen.draft_prefill_s > 0
    assert len(calls) == 1 + sum(s.drafted for s in gen.steps) - 1


def test_heuristic_schedule_grows_after_full_accepts_and_shrinks_after_rejections():
    heuristic = DraftLength("heuristic", gamma=3)
    assert heuristic.next(3, 3, 3) == 5
    assert heuristic.next(5, 5, 5) == 6  # capped at 2 * gamma
    assert heuristic.next(5, 5, 2) == 4
    assert heuristic.next(1, 1, 0) == 1  # never below one draft
    assert DraftLength("fixed", 3).next(3, 3, 3) == 3
    assert DraftLength("confidence", 3).next(3, 3, 0) == 3
    with pytest.raises(ValueError, match="draft length 'sometimes'"):
        DraftLength("sometimes", 3)


@pytest.mark.parametrize("length", ["confidence", "heuristic"])
def test_adaptive_draft_lengths_stay_lossless(target_model, draft_model, length):
    from qspec.measure.prediction import replay_greedy

    plain = generate(target_model, PROMPT, max_new_tokens=40)
    gen = generate(
        target_model,
        PROMPT,
        drafter=ModelDrafter(draft_model),
        # the tiny draft is rarely more sure than 0.1
        length=DraftLength(length, gamma=3, threshold=0.1),
        max_new_tokens=40,
    )
    assert gen.tokens == plain.tokens
    drafted = {s.drafted for s in gen.steps}
    if length == "confidence":
        assert max(drafted) <= 3 and len(drafted) > 1  # stopped early on some steps
    else:
        assert max(drafted) <= 6
    replayed = replay_greedy(
        ModelDrafter(draft_model), PROMPT, gen.tokens, DraftLength(length, 3, 0.1), 40
    )
    assert [(s.drafted, s.accepted, s.emitted) for s in replayed] == [
        (s.drafted, s.accepted, s.emitted) for s in gen.steps
    ]


class ShapeRecorder:
    """A stand-in for Compiled: the eager step, recording how many tokens each forward feeds."""

    def __init__(self):
        from qspec.engine.pointer_cache import forward_step

        self.pool, self.widths, self._step = {}, [], forward_step

    @staticmethod
    def capacity(n: int) -> int:
        return Compiled.capacity(n)

    def step(self, model, cache, ids, *args, **kwargs):
        self.widths.append(ids.numel())
        return self._step(model, cache, ids, *args, **kwargs)


@pytest.mark.parametrize("gamma", [0, 1, 3])
def test_a_compiled_step_feeds_the_last_token_and_gamma_drafts(target_model, gamma):
    """The compiled verify has one shape, gamma + 1 tokens (the last emitted token and gamma
    drafts, padded when fewer were drafted), and plain compiled decoding feeds one token."""
    recorder = ShapeRecorder()
    drafter = NgramDrafter(max_ngram=2) if gamma else None
    gen = generate(
        target_model,
        PROMPT,
        drafter=drafter,
        length=DraftLength(gamma=gamma),
        max_new_tokens=20,
        compiled=recorder,
    )
    assert gen.tokens == generate(target_model, PROMPT, max_new_tokens=20).tokens
    assert len(gen.steps) == len(recorder.widths)  # the prefill is never compiled
    assert set(recorder.widths) == {gamma + 1}


def test_every_cell_of_a_run_decodes_through_caches_of_one_size():
    """A target-only cell (gamma 0) and each speculative cell get the same cache capacity:
    with nf4 on an AVX-512 CPU a cache 3 positions longer moved logits by up to 0.25 (fp32:
    2e-5), and greedy speculative output left the target's own at a near-tie for that alone."""
    from types import SimpleNamespace

    import torch

    from qspec.backends.qspec_loop import run_capacity
    from qspec.config import parse_config

    prompts = [SimpleNamespace(ids=torch.zeros(n), max_new_tokens=32) for n in (40, 90)]
    cfg = parse_config({"gammas": [3, 5], "draft_lengths": ["fixed", "heuristic"]})
    assert run_capacity(cfg, prompts) == 90 + 32 + 2 * 5 + 1  # the heuristic drafts up to 2γ
    assert run_capacity(parse_config({"gammas": [3]}), prompts) == 90 + 32 + 3 + 1

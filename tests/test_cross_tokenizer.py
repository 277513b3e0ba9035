"""Drafts across tokenizers: lossless in both modes, tokens in one vocabulary only included."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_sampling import (
    P_MIN,
    PROMPT,
    broken_accept,
    chi_square_p,
    empirical_pairs,
    exact_pair_distribution,
)
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from qspec.engine.cross_tokenizer import CrossTokenizerDrafter, token_bytes, vocab_map
from qspec.engine.draft_length import DraftLength
from qspec.engine.loop import generate
from qspec.engine.sampling import sampler_for

# target: 6 tokens, "cd" its own; draft: 7 tokens, "ab" and "ba" its own; a..e shared
TARGET_VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "cd": 5}
DRAFT_VOCAB = {"e": 0, "d": 1, "ab": 2, "c": 3, "a": 4, "ba": 5, "b": 6}


def char_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    target_tok = char_tokenizer(TARGET_VOCAB, [("c", "d")])
    draft_tok = char_tokenizer(DRAFT_VOCAB, [("a", "b"), ("b", "a")])
    target = tiny_llama(10, vocab=len(TARGET_VOCAB), hidden=16, layers=1)
    draft = tiny_llama(12, vocab=len(DRAFT_VOCAB), hidden=16, layers=1)
    vocab = vocab_map(target_tok, draft_tok, len(TARGET_VOCAB), len(DRAFT_VOCAB))

    def make():
        return CrossTokenizerDrafter(draft, target_tok, draft_tok, vocab)

    return target, target_tok, draft_tok, vocab, make


def test_the_vocabularies_are_matched_by_their_bytes(pair):
    _, target_tok, draft_tok, vocab, _ = pair
    assert token_bytes(target_tok)[5] == b"cd"
    assert vocab.summary() == {"shared": 5, "draft_only": 2, "target_only": 1}
    by_draft = dict(zip(vocab.draft_ids.tolist(), vocab.target_ids.tolist(), strict=True))
    assert by_draft == {0: 4, 1: 3, 3: 2, 4: 0, 6: 1}


def test_byte_level_and_metaspace_tokens_map_to_their_text():
    from tokenizers import pre_tokenizers

    bl = Tokenizer(models.BPE(vocab={"Ġ": 0, "h": 1, "i": 2, "Ġh": 3, "Ċ": 4}, merges=[("Ġ", "h")]))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    sp = Tokenizer(models.BPE(vocab={"\u2581h": 0, "i": 1, "<0x0A>": 2, "h": 3}, merges=[]))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback()])
    bl_bytes = token_bytes(PreTrainedTokenizerFast(tokenizer_object=bl))
    sp_bytes = token_bytes(PreTrainedTokenizerFast(tokenizer_object=sp))
    assert bl_bytes[3] == b" h" and bl_bytes[4] == b"\n"
    assert sp_bytes[0] == b" h" and sp_bytes[2] == b"\n"


@pytest.mark.parametrize("prompt", [[0, 3, 2, 4], [1, 0, 1], [5, 5, 4, 0, 2]])
def test_greedy_cross_tokenizer_output_equals_target_only(pair, prompt):
    target, target_tok, _, _, make = pair
    ids = torch.tensor(prompt)
    alone = generate(target, ids, max_new_tokens=24)
    drafter = make()
    spec = generate(target, ids, drafter=drafter, length=DraftLength(gamma=3), max_new_tokens=24)
    assert spec.tokens == alone.tokens
    assert sum(s.drafted for s in spec.steps) > 0 and drafter.model_tokens > 0


def test_greedy_drafts_carry_draft_only_tokens_through_their_text(pair):
    """A draft-only token ('ab') reaches the target as its two shared characters: the
    proposal's text is the draft model's own greedy continuation, re-tokenized."""
    _, target_tok, draft_tok, _, make = pair
    drafter = make()
    drafter.prefill(PROMPT, 64)
    proposal, probs = drafter.propose(PROMPT, 4, sampler_for("greedy"), None, PROMPT.tolist())
    context = draft_tok(target_tok.decode(PROMPT))["input_ids"]
    own = generate(drafter.model, torch.tensor(context), max_new_tokens=4)
    drafted_text = draft_tok.decode(own.tokens)
    assert probs is None and proposal.numel() > 0
    assert drafted_text.startswith(target_tok.decode(proposal.tolist()))


SAMPLER = sampler_for("sample", temperature=1.3)


def test_token_level_intersection_sampling_matches_target_distribution(pair):
    """The target-only token 'cd' can only come from corrections; it must still appear at its rate."""
    target, *_, make = pair
    counts = empirical_pairs(target, make, SAMPLER)
    assert chi_square_p(counts, exact_pair_distribution(target, SAMPLER)) > P_MIN


def test_a_broken_acceptance_rule_fails_for_the_cross_tokenizer_pair(pair):
    target, *_, make = pair
    counts = empirical_pairs(target, make, SAMPLER, accept=broken_accept)
    assert chi_square_p(counts, exact_pair_distribution(target, SAMPLER)) < P_MIN


# a SentencePiece-style draft with byte fallback: "<0x61>" and "a" spell the same byte, as do
# "<0x62>" and "b"; its decoder is a Sequence(Replace U+2581, ByteFallback, Fuse)
FALLBACK_VOCAB = {"<0x61>": 0, "a": 1, "b": 2, "<0x62>": 3, "c": 4, "d": 5, "e": 6, "ab": 7}
# a plain Metaspace draft, no byte fallback: "\u2581a" is " a" (a leading space), never "a"
# (its decoder, like Llama's, strips the space of a text's first token: decoding one token
# alone would say "a")
METASPACE_VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "\u2581a": 5, "\u2581": 6}


def fallback_tokenizer():
    tok = Tokenizer(models.BPE(vocab=FALLBACK_VOCAB, merges=[("a", "b")], byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def metaspace_tokenizer():
    from tokenizers import pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=METASPACE_VOCAB, merges=[("\u2581", "a")]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_a_plain_metaspace_decoder_keeps_the_space_of_its_tokens():
    """Detected from the decoder's type: a Metaspace decoder is not plain text."""
    sp = token_bytes(metaspace_tokenizer())
    assert sp[5] == b" a" and sp[0] == b"a" and sp[6] == b" "


def test_draft_tokens_of_the_same_bytes_add_up_in_q(pair):
    """Byte fallback: two draft ids spell "a"; q of the target's "a" is the sum of both."""
    target, target_tok, *_ = pair
    draft_tok = fallback_tokenizer()
    assert token_bytes(draft_tok)[0] == token_bytes(draft_tok)[1] == b"a"
    vocab = vocab_map(target_tok, draft_tok, len(TARGET_VOCAB), len(FALLBACK_VOCAB))
    by_draft = dict(zip(vocab.draft_ids.tolist(), vocab.target_ids.tolist(), strict=True))
    assert by_draft[0] == by_draft[1] == TARGET_VOCAB["a"]
    draft = tiny_llama(13, vocab=len(FALLBACK_VOCAB), hidden=16, layers=1)
    drafter = CrossTokenizerDrafter(draft, target_tok, draft_tok, vocab)
    drafter.prefill(PROMPT, 64)
    q = drafter.shared_probs(PROMPT.tolist(), SAMPLER)
    own = SAMPLER.probs(drafter._sync(PROMPT.tolist()))
    shared = own[vocab.draft_ids]
    expected_a = float((own[0] + own[1]) / shared.sum())
    assert q.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert q[TARGET_VOCAB["a"]].item() == pytest.approx(expected_a, rel=1e-5)


@pytest.mark.parametrize("kind", ["byte fallback", "metaspace"])
def test_sampling_is_exact_for_sentencepiece_drafts(pair, kind):
    """Token-level intersection with a draft whose vocabulary repeats byte strings (byte
    fallback), and with a plain Metaspace draft: the output is still the target's law."""
    target, target_tok, *_ = pair
    # the ids that spell "a" twice: really (byte fallback), or when read wrongly (metaspace)
    draft_tok, vocab_size, seed, twins = {
        "byte fallback": (fallback_tokenizer(), len(FALLBACK_VOCAB), 13, [0, 1]),
        "metaspace": (metaspace_tokenizer(), len(METASPACE_VOCAB), 14, [0, 5]),
    }[kind]
    vocab = vocab_map(target_tok, draft_tok, len(TARGET_VOCAB), vocab_size)
    draft = tiny_llama(seed, vocab=vocab_size, hidden=16, layers=1)
    with torch.no_grad():  # the draft favours those spellings, so a q that drops one shows
        draft.lm_head.weight[twins] *= 3.0

    def make():
        return CrossTokenizerDrafter(draft, target_tok, draft_tok, vocab)

    counts = empirical_pairs(target, make, SAMPLER)
    assert chi_square_p(counts, exact_pair_distribution(target, SAMPLER)) > P_MIN


def test_a_greedy_cross_tokenizer_step_runs_one_draft_forward_per_draft(pair):
    """budget drafts cost budget forwards: the sync's one, then budget - 1 (the last draft's
    logits are never needed), and model_tokens counts the tokens decoded."""
    _, target_tok, draft_tok, vocab, make = pair
    drafter = make()
    drafter.prefill(PROMPT, 64)
    calls = []
    hook = drafter.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        drafter.propose(PROMPT, 4, sampler_for("greedy"), None, PROMPT.tolist())
    finally:
        hook.remove()
    assert len(calls) == 4 and drafter.model_tokens == 4


@pytest.fixture(scope="module")
def other_tokenizer_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Llama with a byte-level BPE of its own (400 tokens), trained here on the suite's
    text: it shares the bytes and some merges with SmolLM2's vocabulary, not its ids."""
    from tokenizers import pre_tokenizers, trainers

    from qspec.suites.discovery import load_suite

    texts = load_suite("example-custom").corpus() or ["def add(a, b):\n    return a + b\n"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator(texts * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    out = tmp_path_factory.mktemp("other-tokenizer")
    model = tiny_llama(4, vocab=len(fast), hidden=64, layers=2, bos_token_id=0, eos_token_id=0)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_a_run_with_a_draft_of_another_tokenizer(
    tmp_path, tiny_model_dir, other_tokenizer_model_dir
):
    """End to end: cross-tokenizer cells are measured, lossless under greedy, predicted on
    policy in both modes, and transformers' universal assisted generation runs beside them."""
    import json as _json

    from conftest import write_config

    from qspec import store
    from qspec.cli import main

    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        _target='precisions = ["fp32"]',
        hf_assisted_modes='["greedy", "sample"]',
    )
    text = (
        open(cfg)
        .read()
        .replace(
            f"[draft]\nref = {_json.dumps(str(tiny_model_dir))}",
            f"[draft]\nref = {_json.dumps(str(other_tokenizer_model_dir))}",
        )
        .replace('precisions = ["nf4", "ngram"]', 'precisions = ["fp32", "self:int8", "ngram"]')
    )
    open(cfg, "w").write(text)
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    recs = store.read(out / "results.jsonl")
    cross = [r for r in recs if r["kind"] == "speculative" and r["draft"] == "fp32"]
    assert {r["mode"] for r in cross} == {"greedy", "sample"}
    for r in cross:
        assert r["status"] == "ok", r["error"]
        info = r["cross_tokenizer"]
        assert info["shared"] > 256 and info["draft_only"] > 0 and info["target_only"] > 0
        assert info["draft_tokens_per_target_token"] > 0
        assert r["alpha_predicted"] is not None and r["alpha_predicted_positions"] > 0
    greedy = next(r for r in cross if r["mode"] == "greedy")
    assert greedy["lossless"] is True and greedy["replay_exact"] is True
    # the target's own int8 copy drafts in the same run, in the target's tokens, screened too
    own = [r for r in recs if r["kind"] == "speculative" and r["draft"] == "self:int8"]
    assert {r["mode"] for r in own} == {"greedy", "sample"}
    for r in own:
        assert r["status"] == "ok", r["error"]
        assert r["cross_tokenizer"] is None and r["alpha_predicted"] is not None
    assert next(r for r in own if r["mode"] == "greedy")["lossless"] is True
    screens = [r for r in recs if r["kind"] == "pair_screen" and r["status"] == "ok"]
    assert [(r["target"], r["draft"]) for r in screens] == [("fp32", "self:int8")]
    variants = {(r["model"], r["precision"]) for r in recs if r["kind"] == "variant"}
    assert (str(tiny_model_dir), "int8") in variants
    # transformers' universal assisted generation (greedy) and universal speculative decoding
    # (sampled, which prunes its draft in place: it gets a copy, and qspec's cells still run)
    peer = [r for r in recs if r["kind"] == "hf_assisted" and r["draft"] == "fp32"]
    assert sorted(r["mode"] for r in peer) == ["greedy", "sample"]
    peer.sort(key=lambda r: r["mode"])
    assert peer[0]["lossless"] is True
    # the peer's acceptance, counted step by step: every emitted token belongs to a step
    for r in [r for r in recs if r["kind"] == "hf_assisted"]:
        assert r["status"] == "ok", r["error"]
        emitted = sum(len(o["tokens"]) for o in r["outputs"])
        assert 0 <= r["accepted"] <= r["drafted"] and r["drafted"] > 0 and r["steps"] > 0
        assert r["tau"] * r["steps"] == pytest.approx(emitted)
        low, high = r["acceptance_rate_ci95"]
        assert low - 1e-9 <= r["acceptance_rate"] <= high + 1e-9
    assert peer[0]["cross_tokenizer"]["draft_tokens_per_target_token"] > 0
    # the target's own int8 copy agrees with it mostly, counted by transformers' loop as by qspec's
    own_peer = next(r for r in recs if r["kind"] == "hf_assisted" and r["draft"] == "self:int8")
    assert own_peer["alpha_measured"] > 0.5
    # sampled, the peer's acceptance is checked against what its own p and q allow: transformers'
    # same-tokenizer speculative sampling is exact (on Gemma + SmolLM2, its cross-tokenizer one
    # is not: README); greedy peers accept by argmax and carry no such check
    for r in recs:
        if r["kind"] == "hf_assisted" and r["draft"] != "ngram":
            assert (r["peer_alpha_exact"] is not None) == (r["mode"] == "sample")
    own_sampled = next(
        r
        for r in recs
        if r["kind"] == "hf_assisted" and r["draft"] == "self:int8" and r["mode"] == "sample"
    )
    assert abs(own_sampled["peer_exact_z"]) < 3.29
    # quality across families: bits per byte of the same corpus text, each in its own tokens
    quality = {r["variant"]: r for r in recs if r["kind"] == "quality"}
    target_q, draft_q = quality["fp32"], quality["draft:fp32"]
    assert draft_q["model"] == str(other_tokenizer_model_dir)
    assert target_q["bytes_scored"] == draft_q["bytes_scored"] > 0
    assert draft_q["positions"] > target_q["positions"]  # 400 tokens cover less text each
    assert 0 < target_q["bits_per_byte"] and 0 < draft_q["bits_per_byte"]

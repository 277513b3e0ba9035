"""An EAGLE-3 head drafting in qspec's loop: the target's states reach it through the Drafter
protocol, it rolls back with the target, greedy output is the target's own, sampled output
follows the target's law, and its per-step prediction walks the steps the engine took."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_sampling import (
    P_MIN,
    broken_accept,
    chi_square_p,
    empirical_pairs,
    exact_pair_distribution,
)

from qspec.engine.draft_length import DraftLength
from qspec.engine.eagle_head import EagleHead, HeadConfig
from qspec.engine.head_drafter import HeadDrafter
from qspec.engine.loop import generate
from qspec.engine.sampling import sampler_for
from qspec.measure.prediction import head_odds
from qspec.measure.step_odds import Expected, expected_run

AUX = (0, 1, 2)


def random_head(target, draft_vocab: int, seed: int) -> EagleHead:
    torch.manual_seed(seed)
    cfg = HeadConfig.from_target(target.config, draft_vocab, AUX)
    head = EagleHead(cfg, target.get_input_embeddings().weight)
    with torch.no_grad():
        head.lm_head.weight.mul_(6.0)  # sharper drafts, so acceptance is not always 0
        if head.d2t is not None:  # the draft vocabulary: target ids spread over the range
            step = target.config.vocab_size // draft_vocab
            head.d2t.copy_(torch.arange(draft_vocab) * (step - 1))
    return head.eval()


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    target = tiny_llama(30, vocab=64, hidden=32, layers=3)
    return target, random_head(target, 32, 31)


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_head_output_equals_target_only(small, gamma):
    target, head = small
    prompt = torch.tensor([0, 5, 9, 12, 5, 9, 30, 7])
    alone = generate(target, prompt, max_new_tokens=30)
    drafter = HeadDrafter(head)
    spec = generate(
        target, prompt, drafter=drafter, length=DraftLength(gamma=gamma), max_new_tokens=30
    )
    assert spec.tokens == alone.tokens
    assert sum(s.drafted for s in spec.steps) > 0


def test_the_head_reads_the_layers_it_names(small):
    target, head = small
    assert HeadDrafter(head).target_layers == AUX
    with pytest.raises(ValueError, match="target's states"):
        HeadDrafter(head).prefill(torch.tensor([0, 1, 2]), 16, None)


def test_greedy_rollouts_walk_the_steps_the_engine_took(small):
    """The head's prediction (teacher-forced target states, rolled out over the output) is the
    engine's run: same steps, same per-position acceptance."""
    target, head = small
    prompt = torch.tensor([0, 5, 9, 12, 5, 9, 30, 7])
    length = DraftLength(gamma=3)
    gen = generate(target, prompt, drafter=HeadDrafter(head), length=length, max_new_tokens=30)
    ids = torch.cat([prompt, torch.tensor(gen.tokens)])
    odds = head_odds(target, HeadDrafter(head), ids, prompt.numel() + 1, sampler_for("greedy"), 3)
    run = expected_run(odds, len(gen.tokens), length, 30)
    assert run == Expected.of_steps(gen.steps, 3)


@pytest.fixture(scope="module")
def six():
    torch.set_num_threads(1)
    target = tiny_llama(10, vocab=6, hidden=16, layers=3)
    return target, random_head(target, 4, 12)


SAMPLER = sampler_for("sample", temperature=1.3)


def test_head_sampling_matches_target_distribution(six):
    target, head = six
    counts = empirical_pairs(target, lambda: HeadDrafter(head), SAMPLER)
    assert chi_square_p(counts, exact_pair_distribution(target, SAMPLER)) > P_MIN


def test_a_broken_acceptance_rule_fails_for_the_head(six):
    target, head = six
    counts = empirical_pairs(target, lambda: HeadDrafter(head), SAMPLER, accept=broken_accept)
    assert chi_square_p(counts, exact_pair_distribution(target, SAMPLER)) < P_MIN


HEADS = "[heads]\nmax_steps = 3\ndraft_vocab_size = 512\n"


def test_a_run_with_draft_heads(tmp_path, tiny_model_dir):
    """End to end: heads trained for the reference and for the quantized target (cached for a
    second run), measured greedy and sampled, predicted per step, and reported side by side."""
    from conftest import write_config

    from qspec import store
    from qspec.cli import main

    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model_dir,
        baselines='["target_only"]',
        _target='precisions = ["fp32", "nf4"]',
        _draft='precisions = ["eagle3", "eagle3-matched"]',
    )
    with open(cfg, "a") as f:
        f.write(HEADS)
    out = tmp_path / "run"
    assert main(["evaluate", "--config", cfg, "--out", str(out), "--quiet"]) == 0
    recs = store.read(out / "results.jsonl")
    heads = {(r["name"], r["trained_on"]): r for r in recs if r["kind"] == "head"}
    assert set(heads) == {("eagle3", "fp32"), ("eagle3-matched", "nf4")}
    for h in heads.values():
        assert h["status"] == "ok", h["error"]
        assert h["training"]["steps"] == 3 and h["heldout"]["a_1_n"] > 0
        assert h["cached"] is False and (tmp_path / "run").exists()
    cells = {(r["target"], r["draft"], r["mode"]): r for r in recs if r["kind"] == "speculative"}
    for (target, draft, mode), r in cells.items():
        if (target, draft) == ("fp32", "eagle3-matched"):  # the reference's matched head: eagle3
            assert r["status"] == "unavailable" and "measured once" in r["error"]
            continue
        assert r["status"] == "ok", r["error"]
        assert r["prediction_method"].startswith("per step: the head rolled out")
        assert len(r["position_acceptance_predicted"]) == r["gamma"]
        if mode == "greedy" and target == "fp32":
            assert r["lossless"] is True
            # greedy rollouts over the output walk the very steps the engine took
            assert r["tau_predicted"] == pytest.approx(r["tau"])
    html = (out / "index.html").read_text()
    assert "reference-trained head (eagle3)" in html and "How each head was made" in html
    again = tmp_path / "again"
    assert main(["evaluate", "--config", cfg, "--out", str(again), "--quiet"]) == 0
    cached = [r for r in store.read(again / "results.jsonl") if r["kind"] == "head"]
    assert cached and all(r["cached"] is True for r in cached)


def test_a_user_head_that_does_not_fit_the_target_exits_2(tmp_path, tiny_model_dir, capsys):
    """Checked from the two configs before any model loads, naming the key and the mismatch."""
    from conftest import write_config

    from qspec.cli import main
    from qspec.models.eagle_checkpoint import save_head

    other = tiny_llama(40, vocab=96, hidden=48, layers=3)
    head = random_head(other, 48, 41)
    folder = save_head(head, tmp_path / "head", {"name_or_path": "other"})
    cfg = write_config(
        tmp_path / "c.toml", tiny_model_dir, _draft=f'precisions = ["eagle3:{folder}"]'
    )
    assert main(["evaluate", "--config", cfg, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"draft.precisions: eagle3:{folder}" in err
    assert "hidden_size: head has 48, target has 64" in err and "vocab_size" in err
    assert not (tmp_path / "o").exists()

"""The verdict and the intervals on a hand-built run with the interval fields
(tests/data/results-intervals, written by its make.py): budgets fail only on significant
losses, options rank by absolute tokens/s, the target alone is served unless a speedup
interval lies above 1, and every proportion and ratio carries its interval and n."""

from __future__ import annotations

import html as htmllib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from qspec.report import Budget, Run, summary_text, write_report
from qspec.report.sections import verdict

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA / "results-intervals"))
import make  # noqa: E402  (the fixture's builder: tests vary its records)


def _text(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"section {sid} missing"
    return htmllib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", m.group(1))))


def _save(run_dir: Path, recs: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run_dir / "run.json").write_text(json.dumps(make.RUN))
    return run_dir


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("intervals") / "run"
    shutil.copytree(DATA / "results-intervals", run_dir)
    return run_dir, write_report(run_dir).read_text(encoding="utf-8")


def test_fixture_is_what_make_writes():
    stored = (DATA / "results-intervals" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in stored] == make.records()


def test_one_document_of_twenty_is_inconclusive_not_failed(page):
    run_dir, html = page
    vq = Run(run_dir).vq["int8"]
    assert vq.verdict == "inconclusive"  # a point comparison would fail it: -5 points
    assert vq.acc_delta_points == pytest.approx(-5.0)
    q = _text(html, "quality")
    assert "inconclusive (n = 20 documents)" in q
    assert "1 / 0 (p = 1.000)" in q  # one document worse, none better: the sign test


def test_a_significant_perplexity_loss_fails(page):
    run_dir, html = page
    run = Run(run_dir)
    assert run.vq["nf4"].verdict == "fail"  # CI 1.15-1.25, entirely above 1.05
    assert run.vq["int8-t0"].verdict == "inconclusive"  # CI 1.01-1.07 straddles 1.05
    assert run.vq["fp32"].verdict == "pass"
    q = _text(html, "quality")
    assert "perplexity +20.0% (95% CI +15.0% to +25.0%), budget +5%: FAILED" in q
    assert "inconclusive (n = 4,096 positions)" in q
    # the failed target's options are not eligible, however fast
    v = verdict.build(run)
    greedy = v["modes"][0]
    nf4 = [p for p in greedy["options"] if p.target == "nf4"]
    assert nf4 and not any(p.eligible for p in nf4)


def test_ranking_is_by_absolute_tokens_per_s_with_targets_alone(page):
    run_dir, html = page
    greedy = verdict.build(Run(run_dir))["modes"][0]
    labels = [p.label for p in greedy["options"]]
    tps = [p.tokens_per_s for p in greedy["options"]]
    assert tps == sorted(tps, reverse=True)
    assert labels[:4] == [
        "nf4 + ngram γ=3 greedy",
        "nf4 alone, greedy",
        "int8 + ngram γ=3 greedy",
        "int8 alone, greedy",
    ]
    v = _text(html, "verdict")
    table = v.split("every option by absolute tokens/s", 1)[1]
    assert table.index("nf4 alone, greedy") < table.index("int8 alone, greedy")
    assert table.index("int8 alone, greedy") < table.index("fp32 alone, greedy")


def test_no_speedup_interval_above_one_serves_the_target_alone(page):
    """int8 alone is faster than fp32 alone, but one lost document of 20 leaves its quality
    inconclusive: it is named beside the headline (another run could fail it), not in it."""
    run_dir, html = page
    v = _text(html, "verdict")
    assert "Greedy decoding: serve target fp32 alone" in v
    assert "no speedup interval lies entirely above 1" in v
    assert "Faster, but its target's quality is inconclusive" in v
    assert "inconclusive (n = 20 documents)): int8 alone, greedy , 12.00 tokens/s" in v
    # the best eligible speculative option (by tokens/s) is named second
    assert (
        "Best speculative option (second): fp32 + ngram γ=3 greedy (confidence draft length)" in v
    )
    assert "Behind this verdict: 20 prompts, 1,280 generated tokens, 4,096 corpus positions" in v
    assert "20 task documents" in v
    assert "Recommended:" not in v
    s = summary_text(run_dir)
    assert "Greedy: serve fp32 alone" in s
    assert s.index("serve fp32 alone") < s.index("best speculative: fp32")
    assert "Faster, quality not shown within budget: int8 alone" in s
    assert "quality inconclusive" in s
    assert "(0.95×–1.35×, n=20)" in s and len(s) <= 900


def test_a_speedup_interval_above_one_is_recommended(tmp_path):
    recs = make.records()
    for r in recs:
        if r.get("kind") == "speculative" and r["target"] == "fp32" and r["draft"] == "ngram":
            if r.get("draft_length") != "confidence":
                r.update(tokens_per_s=13.0, speedup=1.3, speedup_ci95=[1.1, 1.5])
                r["seconds"] = r["tokens"] / 13.0
    run_dir = _save(tmp_path / "run", recs)
    v = _text(write_report(run_dir).read_text(), "verdict")
    assert "Recommended: target fp32 + draft ngram, γ = 3, greedy" in v
    assert "For comparison, the best target alone: fp32 alone, greedy" in v
    assert "Faster, but" not in v  # int8 alone (inconclusive) is slower than the headline
    assert "Greedy: recommended fp32+ngram" in summary_text(run_dir)


def test_shown_faster_but_slower_than_another_target_alone(tmp_path):
    recs = make.records()
    for r in recs:  # faster than fp32 alone, but slower in tokens/s than int8 alone
        if r.get("kind") == "speculative" and r["target"] == "fp32" and r["draft"] == "ngram":
            r.update(speedup_ci95=[1.02, 1.2])
        if r.get("kind") == "task" and r["variant"] == "int8":  # int8 within budget here
            r["doc_scores"] = dict(make.REF_SCORES)
            r["value"] = sum(r["doc_scores"].values()) / 20
    v = _text(write_report(_save(tmp_path / "run", recs)).read_text(), "verdict")
    assert "Greedy decoding: serve target int8 alone" in v
    assert "still slower in absolute tokens/s than this target alone" in v


def test_intervals_and_n_appear_on_the_page(page):
    _, html = page
    v, m = _text(html, "verdict"), _text(html, "matrix")
    assert "1.10× (95% CI 0.90×–1.30×, n = 20 prompts)" in v
    assert "decode-only 1.21×" in v
    assert "95% CI 0.90×–1.30×, n = 20 prompts" in m
    assert "acc. rate 0.60 (95% CI 0.57–0.63, n = 1,200 drafted)" in m
    assert "α 0.720 (95% CI 0.692–0.747, n = 1,000 tested)" in m
    assert "τ 2.80 ± 0.05" in m
    assert "qspec / transformers = 1.20× (95% CI 1.05×–1.37×, n = 20)" in m
    assert "skip-50% (skips layers 3, 5, 7, 9)" in m  # a layer-skip draft like any draft
    q = _text(html, "quality")
    assert "93.0% (95% CI 92.2%–93.7%, n = 4,096)" in q
    assert "1.0100 (95% CI 1.0040–1.0160)" in q
    a = _text(html, "acceptance")
    assert "0.70 (300) / 0.53" in a  # position 2: conditional (n tested) / vLLM unconditional
    assert "0.410 / 0.610 / 0.830 (20)" in a and "2.10 / 2.80 / 3.60 (20)" in a
    assert "short full accepts" in a
    assert "0.700 ± 0.010" in a and "exact" in a  # own-text prediction; greedy replay
    assert "pair screen" in a
    # adaptive draft length beside fixed gamma, and the oracle bound
    assert "confidence" in a and "oracle bound" in a and "16.00" in a and "1.60×" in a
    assert "the cell's own" in _text(html, "pareto") or "the cell's own" in v


def test_batch_invariance_explains_the_mismatches(page):
    _, html = page
    b = _text(html, "invariance")
    assert "int8 no 0.3100 11.7 (3) 256 4" in b
    assert "int8-t0 (bitsandbytes int8 without outlier decomposition) is batch-invariant" in b
    assert "p1 17 0.1200 a near-tie" in b
    assert "p2 40 2.5000 margin above 0.3100" in b
    q = _text(html, "quality")
    assert q.index("default int8 10.100") < q.index("default int8-t0") < q.index("default nf4")


def test_an_old_run_shows_point_values_and_dashes(tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(DATA / "results-small", run_dir)
    html = write_report(run_dir).read_text()
    assert "section-error" not in html
    v = _text(html, "verdict")
    assert "95% CI —" in v and "point comparison" in v
    assert "Point estimate only" in v  # the recommendation rests on a point estimate
    assert "point estimate only" in summary_text(run_dir)


def test_budget_thresholds_move_the_verdict(tmp_path):
    run_dir = _save(tmp_path / "run", make.records())
    assert Run(run_dir, Budget(max_ppl_increase_pct=25.5)).vq["nf4"].verdict == "pass"
    assert Run(run_dir, Budget(max_ppl_increase_pct=20.0)).vq["nf4"].verdict == "inconclusive"
    # a large enough allowance puts one lost document of 20 within the budget
    assert Run(run_dir, Budget(max_accuracy_drop_points=16)).vq["int8"].verdict == "pass"

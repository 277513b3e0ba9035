"""Quality pass on tiny random Llama models, plus one slow check on the real default model."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from scipy import stats as sp
from transformers import LlamaConfig, LlamaForCausalLM

from qspec.engine.sampling import Sampler
from qspec.measure.teacher_forced import quality_pass, tokenize_corpus, windows_for
from qspec.records import QualityRecord

SAMPLE = Sampler(greedy=False, temperature=0.8, top_k=20, top_p=0.9)


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP waits cost 100x."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, scale: float = 0.05, seed: int = 1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return other


def corpus(n: int, seed: int = 2) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n,), generator=gen).tolist()


def test_windows_score_every_target_once():
    for n, window, stride in [(100, 16, 8), (100, 16, 15), (17, 16, 8), (5, 16, 8), (2, 4, 2)]:
        covered = [t for _, first, end in windows_for(n, window, stride) for t in range(first, end)]
        assert covered == list(range(1, n))
        for begin, first, end in windows_for(n, window, stride):
            assert end - begin <= window and first > begin
            assert begin == 0 or first - begin >= window - stride


def test_variant_against_itself():
    m = tiny_model()
    r = quality_pass(
        {"ref": m, "same": m}, "ref", [corpus(80)], window=32, stride=16, sample=SAMPLE,
        pairs=[("ref", "same")],
    )  # fmt: skip
    same, ref = r.variants["same"], r.variants["ref"]
    assert same["kl_mean"] == 0 and same["kl_max"] == 0 and same["top1"] == 1.0
    assert same["ppl"] == ref["ppl"] and same["ppl_ratio"] == 1.0
    assert same["dp_rms"] == 0
    pair = r.pairs[("ref", "same")]
    assert pair["alpha_predicted_greedy"] == 1.0
    assert pair["alpha_predicted_sample"] == pytest.approx(1.0, abs=1e-5)
    assert pair["positions"] == r.tokens == 79


def direct_nll(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


def test_perplexity_matches_full_sequence_and_counts_tokens():
    m = tiny_model()
    ids = corpus(60)
    r = quality_pass({"m": m}, "m", [ids], window=64, stride=32, sample=SAMPLE, pairs=[])
    nll = direct_nll(m, ids)
    assert r.windows == 1 and r.tokens == 59
    assert r.variants["m"]["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    se = math.exp(nll.mean().item()) * nll.std().item() / math.sqrt(59)
    assert r.variants["m"]["ppl_se"] == pytest.approx(se, rel=1e-4)

    # Overlapping windows over two documents: every token after each document's first, once.
    docs = [corpus(150, seed=3), corpus(41, seed=4)]
    seen = []
    r = quality_pass(
        {"m": m}, "m", docs, window=32, stride=12, sample=SAMPLE, pairs=[],
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    assert r.tokens == 149 + 40 and r.variants["m"]["positions"] == 189
    assert seen[-1] == (189, 189) and len(seen) == r.windows
    # With a window as long as the context, sliding is exact: same ppl as full sequences.
    r_full = quality_pass({"m": m}, "m", docs, window=256, stride=128, sample=SAMPLE, pairs=[])
    full = torch.cat([direct_nll(m, d) for d in docs])
    assert r_full.variants["m"]["ppl"] == pytest.approx(math.exp(full.mean().item()), rel=1e-5)

    capped = quality_pass(
        {"m": m}, "m", docs, window=32, stride=12, sample=SAMPLE, pairs=[], max_tokens=50
    )
    assert capped.tokens == 50 and capped.pairs == {}


def test_perturbed_copy_and_sampled_alpha_on_one_position():
    m = tiny_model()
    noisy = perturbed(m, scale=0.5)
    ids = corpus(40)
    r = quality_pass(
        {"ref": m, "noisy": noisy}, "ref", [ids], window=64, stride=32, sample=SAMPLE,
        pairs=[("ref", "noisy"), ("noisy", "ref")],
    )  # fmt: skip
    v = r.variants["noisy"]
    assert v["kl_mean"] > 0 and v["kl_max"] >= v["kl_p99"] >= v["kl_median"] >= 0
    assert v["top1"] < 1.0 and v["dp_rms"] > 0
    a = r.pairs[("ref", "noisy")]
    assert 0 < a["alpha_predicted_sample"] < 1 and 0 <= a["alpha_predicted_greedy"] < 1
    assert a["alpha_predicted_sample"] == pytest.approx(
        r.pairs[("noisy", "ref")]["alpha_predicted_sample"]
    )

    # Independently: 1 - TV on a one-position corpus, with the transform done by hand.
    one = ids[:2]
    r1 = quality_pass(
        {"ref": m, "noisy": noisy}, "ref", [one], window=64, stride=32, sample=SAMPLE,
        pairs=[("ref", "noisy")],
    )  # fmt: skip
    assert r1.tokens == 1

    def transformed(model):
        with torch.inference_mode():
            logits = (
                model(input_ids=torch.tensor([one[:1]])).logits[0, -1].double() / SAMPLE.temperature
            )
        kth = logits.topk(SAMPLE.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
        p = logits.softmax(-1)
        order = p.argsort(descending=True)
        keep = (p[order].cumsum(0) - p[order]) < SAMPLE.top_p
        q = torch.zeros_like(p)
        q[order[keep]] = p[order[keep]]
        return q / q.sum()

    l1 = (transformed(m) - transformed(noisy)).abs().sum().item()
    assert r1.pairs[("ref", "noisy")]["alpha_predicted_sample"] == pytest.approx(
        1 - 0.5 * l1, abs=1e-5
    )


def test_paired_ppl_ratio_and_top1_interval():
    m = tiny_model()
    noisy = perturbed(m, scale=0.3)
    docs = [corpus(90, seed=3), corpus(50, seed=4)]
    r = quality_pass(
        {"ref": m, "noisy": noisy, "same": m}, "ref", docs, window=256, stride=128,
        sample=SAMPLE, pairs=[],
    )  # fmt: skip
    v, same = r.variants["noisy"], r.variants["same"]
    assert v["ln_ppl_ratio"] == pytest.approx(math.log(v["ppl"] / r.variants["ref"]["ppl"]))
    assert v["ln_ppl_ratio"] == pytest.approx(math.log(v["ppl_ratio"]), rel=1e-12)
    # the SE of the mean per-position difference, computed directly on full sequences
    diff = torch.cat([direct_nll(noisy, d) - direct_nll(m, d) for d in docs]).double()
    assert v["ln_ppl_ratio"] == pytest.approx(diff.mean().item(), rel=1e-4)
    se = diff.std().item() / math.sqrt(diff.numel())
    assert v["ln_ppl_ratio_se"] == pytest.approx(se, rel=1e-3)
    low, high = v["ppl_ratio_ci95"]
    mean, se = v["ln_ppl_ratio"], v["ln_ppl_ratio_se"]
    assert (low, high) == pytest.approx((math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)))
    assert low < v["ppl_ratio"] < high
    # pairing: far tighter than the unpaired perplexities' own errors would allow
    assert se < v["ppl_se"] / v["ppl"]
    # top-1 agreement: Wilson with n = positions
    n = v["positions"]
    ci = sp.binomtest(round(v["top1"] * n), n).proportion_ci(method="wilson")
    assert v["top1_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-9)
    assert v["top1_ci95"][0] < v["top1"] < v["top1_ci95"][1]
    # the reference against itself
    assert same["ln_ppl_ratio"] == 0 and same["ln_ppl_ratio_se"] == 0
    assert same["ppl_ratio_ci95"] == [1.0, 1.0]
    assert same["top1_ci95"] == pytest.approx([1 - 1.96**2 / (n + 1.96**2), 1.0], abs=1e-4)
    # the record takes the stats as they are (extra fields forbidden)
    rec = QualityRecord(suite="s", variant="noisy", **v)
    assert rec.ln_ppl_ratio == v["ln_ppl_ratio"] and rec.top1_ci95 == v["top1_ci95"]


class _Tok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_corpus_joins_with_eos_and_caps():
    assert tokenize_corpus(_Tok(), ["ab", "cd"], None) == [[97, 98, 0, 99, 100]]
    assert tokenize_corpus(_Tok(), ["ab", "cd"], 3) == [[97, 98, 0, 99]]


@pytest.mark.slow
def test_real_model_int8_closer_than_nf4():
    import time
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import qspec.config  # noqa: F401  (before qspec.models.refs: config -> variants -> models cycle)
    from qspec.models.refs import resolve

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    path = resolve("smollm2-135m-instruct").location
    tok = AutoTokenizer.from_pretrained(path)
    load = dict(dtype=torch.float32)
    bnb = dict(device_map="cpu", dtype=torch.float32)
    models = {
        "fp32": AutoModelForCausalLM.from_pretrained(path, **load),
        "int8": AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), **bnb
        ),
        "nf4": AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
            **bnb,
        ),
    }
    ids = tokenize_corpus(tok, [topics["assert"], topics["if"]], max_tokens=300)
    pairs = [("fp32", "int8"), ("fp32", "nf4")]
    start = time.perf_counter()
    r = quality_pass(
        models, "fp32", ids, window=512, stride=256, sample=Sampler(greedy=False), pairs=pairs
    )
    elapsed = time.perf_counter() - start
    v, p = r.variants, r.pairs
    for name in models:
        print(name, {k: v[name][k] for k in ("ppl", "kl_mean", "kl_p99", "top1", "dp_rms")})
    for pair in pairs:
        print(pair, p[pair])
    print(f"{r.windows} window(s), {r.tokens} tokens, {elapsed / r.windows:.2f} s per window")
    assert r.tokens == 300
    assert v["int8"]["kl_mean"] < v["nf4"]["kl_mean"]
    assert v["int8"]["top1"] > v["nf4"]["top1"]
    assert (
        p[("fp32", "int8")]["alpha_predicted_sample"] > p[("fp32", "nf4")]["alpha_predicted_sample"]
    )

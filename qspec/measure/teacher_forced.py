"""Teacher-forced quality pass and pair screening, one forward pass per variant per window.

Every variant reads the same corpus windows. For each window all variants run once, then
every per-variant statistic (perplexity, KL against the reference, top-1 agreement, delta-p)
and every per-pair statistic (predicted acceptance, greedy and sampled) is computed from those
logits. Only one float per position per statistic survives the window; the logits are dropped
before the next one, so memory does not grow with the corpus or with the number of pairs.

Windowing follows the Hugging Face perplexity guide's sliding window: windows of `window`
tokens start every `stride` tokens, and each window scores only the tokens the previous window
did not, so every token after the first of a document is scored exactly once, with at least
`window - stride` tokens of left context (except near the start of a document).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qspec.engine.sampling import Sampler
from qspec.measure.prediction import agreement, overlap
from qspec.measure.stats import Z95, mean_se, wilson

ROW_CHUNK = 128  # positions per statistics chunk: bounds the float32 (rows, vocab) temporaries


@dataclass
class QualityResult:
    # per variant: ppl, paired ln ppl ratio, KL vs reference, top-1, delta-p (_variant_summary)
    variants: dict[str, dict]
    pairs: dict[tuple[str, str], dict]  # (target, draft) -> predicted alpha, greedy and sampled
    tokens: int  # scored positions
    windows: int


def tokenize_corpus(tokenizer, texts: list[str], max_tokens: int | None) -> list[list[int]]:
    """Concatenate the texts into one stream, EOS between documents, so windows are full.

    Returns a single document. With max_tokens the stream keeps max_tokens + 1 tokens, which is
    exactly max_tokens scored positions (the first token has nothing to predict it).
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(stream) > max_tokens:
            break
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    return [stream]


def windows_for(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored target, end) per window over a document of n tokens.

    Targets are token indices; target t is predicted from ids[begin:t]. Targets 1..n-1 are
    each covered by exactly one window.
    """
    out, scored_to = [], 1
    for begin in range(0, max(n - 1, 0), stride):
        end = min(begin + window, n)
        if end > scored_to:
            out.append((begin, scored_to, end))
            scored_to = end
        if end == n:
            break
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _context_limit(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.inference_mode()
def _scored_logits(model, ids: torch.Tensor, begin: int, first: int, end: int) -> torch.Tensor:
    """float32 logits (end - first, V) predicting ids[first:end]; the lm head runs only on those rows."""
    inputs = ids[begin : end - 1].to(_device(model)).view(1, -1)
    out = model(input_ids=inputs, use_cache=False, logits_to_keep=end - first)
    return out.logits[0].float()


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs) if xs else torch.empty(0)


def _mean_se(x: torch.Tensor) -> tuple[float | None, float | None]:
    return mean_se(x.double().tolist())


def _paired_ln_ratio(nll, ref_nll) -> dict:
    """ln(PPL_variant / PPL_reference) as the mean of per-position nll differences, with its SE.

    Paired over the same positions (llama.cpp's perplexity tool reports the same figure): the
    spread of nll across positions, far larger than the difference, cancels, so a small drop
    is resolved where two unpaired perplexities with their own errors would overlap.
    """
    if nll.numel() == 0 or nll.shape != ref_nll.shape:
        return {"ln_ppl_ratio": None, "ln_ppl_ratio_se": None, "ppl_ratio_ci95": None}
    mean, se = _mean_se(nll.double() - ref_nll.double())
    ci = None
    if se is not None:
        ci = [math.exp(mean - Z95 * se), math.exp(mean + Z95 * se)]
    return {"ln_ppl_ratio": mean, "ln_ppl_ratio_se": se, "ppl_ratio_ci95": ci}


def _variant_summary(nll, kl, top1, dp, ref_nll) -> dict:
    """Per-variant figures. ppl_se is the delta method: ppl * std(nll) / sqrt(n).

    Standard errors (and the intervals built on them: ln_ppl_ratio's, top-1's Wilson) treat
    positions as independent; neighbouring positions share context, so they are a lower
    bound on the real uncertainty.
    """
    n = nll.numel()
    ppl_ref = math.exp(ref_nll.double().mean().item()) if ref_nll.numel() else None
    nll_mean, nll_se = _mean_se(nll)
    ppl = math.exp(nll_mean) if n else None
    kl_mean, kl_se = _mean_se(kl)
    top1_mean, top1_se = _mean_se(top1)
    dp_mean, dp_se = _mean_se(dp)
    kl_np = kl.double().numpy()
    q = (lambda p: float(np.percentile(kl_np, p))) if n else (lambda p: None)
    return {
        "positions": n,
        "nll_mean": nll_mean,
        "ppl": ppl,
        "ppl_se": ppl * nll_se if ppl is not None and nll_se is not None else None,
        "ppl_ratio": ppl / ppl_ref if ppl is not None and ppl_ref else None,
        "kl_mean": kl_mean,
        "kl_mean_se": kl_se,
        "kl_median": q(50),
        "kl_p95": q(95),
        "kl_p99": q(99),
        "kl_max": float(kl.max().item()) if n else None,
        "top1": top1_mean,
        "top1_se": top1_se,
        "top1_ci95": list(wilson(round(top1.double().sum().item()), n)) if n else None,
        "dp_mean": dp_mean,
        "dp_mean_se": dp_se,
        "dp_rms": math.sqrt(dp.double().pow(2).mean().item()) if n else None,
        **_paired_ln_ratio(nll, ref_nll),
    }


def quality_pass(
    models: dict[str, torch.nn.Module],
    reference: str,
    token_ids,
    *,
    window: int = 512,
    stride: int = 256,
    sample: Sampler,
    pairs: list[tuple[str, str]],
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> QualityResult:
    """Score every variant and every (target, draft) pair on the corpus documents in token_ids.

    token_ids: documents, each a list of ints or a 1-D tensor; windows never cross documents.
    KL(P_ref || P_variant) and delta-p use temperature 1 (the models' own distributions);
    alpha_predicted_sample uses `sample`'s temperature/top-k/top-p, alpha_predicted_greedy the
    argmax. Models whose vocabularies differ in size are compared on the shared prefix of the
    vocabulary (the extra rows are padding in the families that do this).
    """
    window, stride = _checked(models, reference, pairs, window, stride)
    sampled = dataclasses.replace(sample, greedy=False)
    docs = [torch.as_tensor(d, dtype=torch.long).view(-1) for d in token_ids]
    plan = [(i, w) for i, d in enumerate(docs) for w in windows_for(d.numel(), window, stride)]
    total = sum(end - first for _, (_, first, end) in plan)
    if max_tokens is not None:
        total = min(total, max_tokens)

    per_var = {v: {"nll": [], "kl": [], "top1": [], "dp": []} for v in models}
    per_pair = {p: {"greedy": [], "sample": []} for p in pairs}
    scored = n_windows = 0
    for doc_i, (begin, first, end) in plan:
        if scored >= total:
            break
        end = min(end, first + total - scored)
        ids = docs[doc_i]
        logits = {v: _scored_logits(m, ids, begin, first, end) for v, m in models.items()}
        dev = logits[reference].device
        vocab = min(x.shape[-1] for x in logits.values())
        logits = {v: x[:, :vocab].to(dev) for v, x in logits.items()}
        targets = ids[first:end].to(dev).view(-1, 1)
        for lo in range(0, end - first, ROW_CHUNK):
            chunk = {v: x[lo : lo + ROW_CHUNK] for v, x in logits.items()}
            _chunk_stats(
                chunk, reference, targets[lo : lo + ROW_CHUNK], pairs, sampled, per_var, per_pair
            )
        del logits
        scored += end - first
        n_windows += 1
        if progress is not None:
            progress(scored, total)
    variants, pair_out = _summaries(per_var, per_pair, reference)
    return QualityResult(variants=variants, pairs=pair_out, tokens=scored, windows=n_windows)


def _checked(models, reference, pairs, window: int, stride: int) -> tuple[int, int]:
    """The window and stride to use, after checking the inputs name what is loaded."""
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(models)}")
    for t, d in pairs:
        if t not in models or d not in models:
            raise ValueError(f"pair {(t, d)} names a variant that is not loaded")
    if window < 2:
        raise ValueError("window must hold at least 2 tokens")
    limits = [c for c in (_context_limit(m) for m in models.values()) if c]
    window = min([window, *limits])
    # stride == window would leave the first target of a window with no context at all.
    return window, max(1, min(stride, window - 1))


def _summaries(per_var: dict, per_pair: dict, reference: str) -> tuple[dict, dict]:
    """Per-variant and per-pair figures from the per-position scalars."""
    ref_nll = _cat(per_var[reference]["nll"])
    variants = {
        v: _variant_summary(*(_cat(s[k]) for k in ("nll", "kl", "top1", "dp")), ref_nll)
        for v, s in per_var.items()
    }
    pairs = {}
    for p, s in per_pair.items():
        g_mean, g_se = _mean_se(_cat(s["greedy"]))
        s_mean, s_se = _mean_se(_cat(s["sample"]))
        pairs[p] = {
            "alpha_predicted_greedy": g_mean,
            "alpha_predicted_greedy_se": g_se,
            "alpha_predicted_sample": s_mean,
            "alpha_predicted_sample_se": s_se,
            "positions": _cat(s["greedy"]).numel(),
        }
    return variants, pairs


def _chunk_stats(logits, reference, targets, pairs, sampled, per_var, per_pair) -> None:
    """Append per-position scalars for one chunk of rows; everything here is float32 on one device."""
    logp = {v: x.log_softmax(-1) for v, x in logits.items()}
    ref_logp = logp[reference]
    ref_p = ref_logp.exp()
    top = {v: lp.argmax(-1) for v, lp in logp.items()}
    ref_true = ref_p.gather(-1, targets).squeeze(-1)
    for v, lp in logp.items():
        true_lp = lp.gather(-1, targets).squeeze(-1)
        # log_softmax of finite logits is finite, so where p_ref underflows to 0 the term is 0.
        kl = (ref_p * (ref_logp - lp)).sum(-1)
        s = per_var[v]
        s["nll"].append(-true_lp.cpu())
        s["kl"].append(kl.clamp_min(0).cpu())
        s["top1"].append((top[v] == top[reference]).float().cpu())
        s["dp"].append((true_lp.exp() - ref_true).cpu())
    # prediction.beta's two formulas, on transformed distributions computed once per variant
    # rather than once per pair (top-p sorts the vocabulary).
    paired = {v for pair in pairs for v in pair}
    probs = {v: sampled.probs(logits[v]) for v in paired}
    for t, d in pairs:
        per_pair[(t, d)]["greedy"].append(agreement(top[t], top[d]).cpu())
        per_pair[(t, d)]["sample"].append(overlap(probs[t], probs[d]).cpu())

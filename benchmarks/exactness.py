"""Is speculative sampling across two real tokenizers exact? A script, not a test.

Drafts across tokenizers go through token-level intersection (engine/cross_tokenizer.py): the
draft's distribution restricted to the tokens both vocabularies spell with the same bytes,
laid over the target's vocabulary, summing the draft tokens that spell the same bytes
(SentencePiece's byte fallback spells "A" twice). Rejection sampling with any proposal is
exact, so the output must follow the target's own distribution. For a real pair this
script checks it where the exact law is computable:

- sampled, with top-k 20 (the same transform on p and q, as the engine applies it): many
  generations after a prompt; the first token comes from the target's prefill, the second is
  the first one the first speculative step emits (its first draft accepted, or the
  correction). Its counts are compared with the target's exact marginal law,
  sum over the first token x of p(x | prompt) p(. | prompt, x) (20 forwards), by a
  chi-square test (cells with an expected count under 5 pooled);
- greedy: the speculative output of a few prompts equals the target's own, token for token.

    python benchmarks/exactness.py --target smollm2-135m-instruct --draft gemma3-270m
    python benchmarks/exactness.py --target gemma3-270m --draft smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from qspec.engine.cross_tokenizer import CrossTokenizerDrafter, logits_rows, vocab_map
from qspec.engine.draft_length import DraftLength
from qspec.engine.loop import generate
from qspec.engine.sampling import sampler_for
from qspec.models.refs import resolve

PROMPT = "The capital of France is"
GREEDY_PROMPTS = (
    "def fibonacci(n):\n    ",
    "The os.path module provides",
    "To read a file line by line in Python, ",
)


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def load(ref: str):
    location = resolve(ref).location
    tok = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    return model, tok


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@torch.inference_mode()
def sampled_check(target, drafter_for, prompt: torch.Tensor, args) -> dict:
    sampler = sampler_for("sample", temperature=args.temperature, top_k=args.top_k)
    first = sampler.probs(target(prompt.view(1, -1)).logits[0, -1])
    exact = torch.zeros_like(first)
    for x in first.nonzero().flatten().tolist():
        ids = torch.cat([prompt, torch.tensor([x])]).view(1, -1)
        exact += first[x] * sampler.probs(target(ids).logits[0, -1])
    counts = torch.zeros_like(exact)
    rng = torch.Generator().manual_seed(args.seed)
    drafted = accepted = 0
    start = time.perf_counter()
    for _ in range(args.trials):
        gen = generate(
            target, prompt, drafter=drafter_for(), length=DraftLength(gamma=args.gamma),
            sampler=sampler, max_new_tokens=args.gamma + 2, generator=rng,
        )  # fmt: skip
        if len(gen.tokens) < 2:
            continue
        counts[gen.tokens[1]] += 1
        drafted += gen.steps[0].drafted
        accepted += gen.steps[0].accepted
    return {
        "runs": int(counts.sum()),
        "first_step_accepted": f"{accepted}/{drafted}",
        "chi_square_p": chi_square(counts, exact),
        "emitted_outside_support": int(counts[exact == 0].sum()),
        "seconds": round(time.perf_counter() - start),
    }


@torch.inference_mode()
def greedy_check(target, tok, drafter_for, gamma: int) -> list[bool]:
    out = []
    for text in GREEDY_PROMPTS:
        prompt = torch.tensor(tok(text)["input_ids"])
        alone = generate(target, prompt, max_new_tokens=32)
        spec = generate(
            target,
            prompt,
            drafter=drafter_for(),
            length=DraftLength(gamma=gamma),
            max_new_tokens=32,
        )
        out.append(spec.tokens == alone.tokens)
    return out


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    target, target_tok = load(args.target)
    draft, draft_tok = load(args.draft)
    vocab = vocab_map(target_tok, draft_tok, logits_rows(target), logits_rows(draft))
    twins = vocab.draft_ids.numel() - vocab.target_ids.unique().numel()
    print(f"{args.draft} drafting for {args.target}: {vocab.summary()}")
    print(f"draft tokens sharing a target token with another draft token: {twins}")

    def drafter_for():
        return CrossTokenizerDrafter(draft, target_tok, draft_tok, vocab)

    prompt = torch.tensor(target_tok(PROMPT)["input_ids"])
    print("sampled:", sampled_check(target, drafter_for, prompt, args))
    print("greedy lossless per prompt:", greedy_check(target, target_tok, drafter_for, args.gamma))


if __name__ == "__main__":
    main()

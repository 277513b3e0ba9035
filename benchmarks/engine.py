"""Engine speed next to transformers, in one run: a script, not a test.

For one pairing and each gamma it prints qspec's speculative tokens/s, transformers'
assisted generation tokens/s, target-only tokens/s through qspec and through
transformers' generate, the ratios between them, and qspec's per-step overhead
(step wall time minus the time spent inside the two models' forward calls).

    python benchmarks/engine.py --target fp32 --draft nf4 --gammas 1 2 4
"""

from __future__ import annotations

import argparse
import time

import torch

from qspec.baselines import hf_assisted, hf_generate
from qspec.drafters import MODEL_FREE_DRAFTERS, ModelDrafter
from qspec.engine import generate, sync
from qspec.environment import describe, pick_device
from qspec.metrics import acceptance
from qspec.models import resolve
from qspec.runner import prompt_ids, spread
from qspec.sampling import sampler_for
from qspec.suites import load_suite
from qspec.variants import BuildContext, build


class ForwardTimer:
    """Seconds spent inside a module's forward, via hooks (synchronised on CUDA)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.seconds, self._start, self.device = 0.0, 0.0, device
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        sync(self.device)
        self._start = time.perf_counter()

    def _post(self, *_):
        sync(self.device)
        self.seconds += time.perf_counter() - self._start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--target", default="fp32")
    ap.add_argument("--draft", default="nf4")
    ap.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--mode", default="greedy", choices=["greedy", "sample"])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions (after one warm-up)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    device = pick_device(args.device)
    where = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(where.location)
    eos = frozenset([tok.eos_token_id])
    target = build(args.target, BuildContext(where.location, device.type))
    draft_model = None
    if args.draft not in MODEL_FREE_DRAFTERS:
        draft_model = (
            target
            if args.draft == args.target
            else build(args.draft, BuildContext(where.location, device.type))
        )
    prompts = [
        torch.tensor(prompt_ids(tok, p), device=device)
        for p in spread(load_suite("default").prompts, args.prompts)
    ]
    sampler = sampler_for(args.mode, temperature=1.0)
    t_timer = ForwardTimer(target, device)
    d_timer = (
        ForwardTimer(draft_model, device)
        if draft_model is not None and draft_model is not target
        else None
    )

    def new_drafter():
        if draft_model is None:
            return MODEL_FREE_DRAFTERS[args.draft]()
        return ModelDrafter(draft_model)

    def timed(fn) -> tuple[float, int, list]:
        fn(prompts[0], 8)  # warm-up, not counted
        for timer in (t_timer, d_timer):
            if timer is not None:
                timer.seconds = 0.0
        seconds, tokens, extra = 0.0, 0, []
        for _ in range(args.repeats):
            for i, p in enumerate(prompts):
                n, secs, info = fn(p, args.max_new_tokens, seed=i)
                tokens += n
                seconds += secs
                extra.append(info)
        return tokens / seconds, tokens, extra

    def qspec_run(gamma):
        def fn(p, n, seed=0):
            g = generate(
                target,
                p,
                drafter=new_drafter() if gamma else None,
                gamma=gamma,
                sampler=sampler,
                max_new_tokens=n,
                eos_ids=eos,
                generator=torch.Generator(device).manual_seed(seed),
            )
            return len(g.tokens), g.total_s, g

        return fn

    def hf_run(gamma):
        def fn(p, n, seed=0):
            run = dict(
                sampler=sampler, max_new_tokens=n, eos_ids=eos, seed=seed, pad_id=tok.eos_token_id
            )
            if gamma == 0:
                toks, secs = hf_generate(target, p, **run)
            else:
                toks, secs = hf_assisted(target, p, draft_model=draft_model, gamma=gamma, **run)
            return len(toks), secs, None

        return fn

    print(
        f"# {describe(device)} | model {args.model} | target {args.target} | draft {args.draft} | "
        f"mode {args.mode} | {len(prompts)} prompts x {args.max_new_tokens} new tokens x {args.repeats} repeats"
    )
    base_q, _, _ = timed(qspec_run(0))
    base_hf, _, _ = timed(hf_run(0))
    print(
        f"target-only tokens/s: qspec {base_q:.2f} | transformers generate {base_hf:.2f} | ratio {base_q / base_hf:.2f}"
    )
    print(
        "gamma | qspec tok/s | hf assisted tok/s | qspec/hf | qspec speedup | hf speedup | alpha | tau | overhead"
    )
    for gamma in args.gammas:
        spec_q, _, gens = timed(qspec_run(gamma))
        forward_s = t_timer.seconds + (d_timer.seconds if d_timer else 0.0)
        steps = [s for g in gens for s in g.steps]
        step_s = sum(s.draft_s + s.verify_s for s in steps)
        prefill_s = sum(g.prefill_s for g in gens)
        overhead = 1 - forward_s / (step_s + prefill_s) if step_s else float("nan")
        stats = acceptance(steps, gamma)
        spec_hf, _, _ = timed(hf_run(gamma))
        alpha = stats["alpha_measured"]
        print(
            f"{gamma:5d} | {spec_q:11.2f} | {spec_hf:17.2f} | {spec_q / spec_hf:8.2f} | {spec_q / base_q:13.2f} | "
            f"{spec_hf / base_hf:10.2f} | {alpha if alpha is not None else float('nan'):.3f} | "
            f"{stats['tau']:.2f} | {overhead:7.1%}"
        )


if __name__ == "__main__":
    main()

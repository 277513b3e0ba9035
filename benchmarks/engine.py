"""Engine speed next to transformers, in one run: a script, not a test.

For one pairing and each gamma it prints qspec's speculative tokens/s, transformers'
assisted generation tokens/s, target-only tokens/s through qspec and through
transformers' generate, the ratios between them, and qspec's per-step overhead
(step wall time minus the time spent inside the two models' forward calls). It also
prints the bandwidth roofline: the device's measured copy bandwidth, and the fraction of
it that target-only decode steps and verify steps reach when reading the weights.

qspec and transformers run alternately, prompt by prompt, so drift in the machine's
speed (other tenants, clocks) lands on both. Compilation (--compile) happens in the
untimed warm-up and is printed on its own line.

    python benchmarks/engine.py --target fp32 --draft nf4 --gammas 1 2 4
    python benchmarks/engine.py --target fp16 --draft fp16 --compile on   # CUDA
    python benchmarks/engine.py --random 1b --target fp16 --draft fp16     # speed only

--random builds a Llama of a realistic size with random weights (saved once under
$QSPEC_CACHE/random-models/, where `qspec cache list`, `qspec cache clear` and the cache
limit see it like any entry), for speed and roofline figures where real weights of that
size cannot be downloaded. Its acceptance means nothing except with a self-draft.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch

from qspec import cache
from qspec.backends.interface import Timed
from qspec.backends.transformers_peer import hf_assisted, hf_generate
from qspec.engine.compiled import Compiled
from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import MODEL_FREE_DRAFTERS, ModelDrafter
from qspec.engine.loop import generate, sync
from qspec.engine.sampling import sampler_for
from qspec.environment import describe, pick_device
from qspec.measure.acceptance import Acceptance
from qspec.measure.roofline import copy_bandwidth, roofline
from qspec.measure.speedup import PairedRatio
from qspec.models.builders import BuildContext, build, weight_bytes
from qspec.models.refs import resolve
from qspec.runner import calibration_texts
from qspec.suites.discovery import load_suite
from qspec.suites.encoding import prompt_ids, spread, stop_ids


class ForwardTimer:
    """Seconds spent inside a module's forward, via hooks (synchronised on CUDA)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.seconds, self._start, self.device = 0.0, 0.0, device
        self.on = False  # counts only while qspec runs, not while transformers does
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        if self.on:
            sync(self.device)
            self._start = time.perf_counter()

    def _post(self, *_):
        if self.on:
            sync(self.device)
            self.seconds += time.perf_counter() - self._start


# Llama-family shapes (hidden, intermediate, layers, heads, kv heads) of common sizes; the
# vocabulary is the default model's, so its tokenizer encodes the prompts.
RANDOM_SHAPES = {
    "1b": (2048, 8192, 16, 32, 8),
    "3b": (3072, 8192, 28, 24, 8),
    "8b": (4096, 14336, 32, 32, 8),
}


def random_model_dir(size: str, tokenizer_dir: str) -> str:
    """A random-weight Llama of the given size on disk (built once), with the default tokenizer.

    Built in a temporary folder and moved into place whole: an interrupted multi-GB build
    is never mistaken for a finished one.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = cache.entry_dir("random-models", f"llama-{size}")
    if (out / "config.json").exists():
        cache.touch(out)
        return str(out)
    hidden, inter, layers, heads, kv = RANDOM_SHAPES[size]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float16",
    )
    torch.manual_seed(0)
    with cache.atomic_dir(out) as tmp:
        LlamaForCausalLM(cfg).half().save_pretrained(tmp)
        tok.save_pretrained(tmp)
    cache.touch(out)
    cache.enforce_limit(keep=out)
    return str(out)


def parse_args():
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
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over the prompts")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--random", choices=sorted(RANDOM_SHAPES), help="random weights (speed only)")
    ap.add_argument(
        "--compile", default="auto", choices=["auto", "on", "off"], help="auto: on for CUDA"
    )
    return ap.parse_args()


@dataclass
class Bench:
    """One pairing set up for timing: the models, the prompts and how they are run."""

    args: argparse.Namespace
    device: torch.device
    compile: bool
    tok: object
    target: torch.nn.Module
    draft_model: torch.nn.Module | None
    prompts: list[torch.Tensor]
    eos: frozenset[int]
    capacity: int
    timers: list[ForwardTimer]
    compiled: dict = field(default_factory=dict)

    def compiled_for(self, model):
        """The caller's compile decision: one Compiled per model, reused by every generation."""
        if not self.compile:
            return None
        return self.compiled.setdefault(model, Compiled(model))


def setup(args) -> Bench:
    from transformers import AutoTokenizer

    device = pick_device(args.device)
    compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    location = resolve(args.model).location
    if args.random:
        location = random_model_dir(args.random, location)
        args.model = f"random llama-{args.random}"
    tok = AutoTokenizer.from_pretrained(location)
    suite = load_suite("default")
    # the run's calibration text (GPTQ), from the end of the default suite's corpus
    ctx = BuildContext(location, device.type, calibration_texts=calibration_texts([suite]))
    target = build(args.target, ctx)
    draft_model = None
    if args.draft not in MODEL_FREE_DRAFTERS:
        draft_model = target if args.draft == args.target else build(args.draft, ctx)
    prompts = [
        torch.tensor(prompt_ids(tok, p), device=device) for p in spread(suite.prompts, args.prompts)
    ]
    # Hooks inside a compiled graph would break it, so compiled runs report no overhead.
    timers = [] if compile else [ForwardTimer(target, device)]
    if not compile and draft_model is not None and draft_model is not target:
        timers.append(ForwardTimer(draft_model, device))
    capacity = max(p.numel() for p in prompts) + args.max_new_tokens + max(args.gammas) + 1
    eos = stop_ids(tok, target)  # the same stop tokens as the evaluation's cells
    return Bench(args, device, compile, tok, target, draft_model, prompts, eos, capacity, timers)


def qspec_run(b: Bench, gamma: int):
    sampler = sampler_for(b.args.mode, temperature=1.0)

    def fn(p, n, seed=0):
        drafter = None
        if gamma and b.draft_model is None:
            drafter = MODEL_FREE_DRAFTERS[b.args.draft]()
        elif gamma:
            drafter = ModelDrafter(b.draft_model, compiled=b.compiled_for(b.draft_model))
        return generate(
            b.target,
            p,
            drafter=drafter,
            length=DraftLength(gamma=gamma),
            sampler=sampler,
            max_new_tokens=n,
            eos_ids=b.eos,
            generator=torch.Generator(b.device).manual_seed(seed),
            compiled=b.compiled_for(b.target),
            capacity=b.capacity,
        )

    return fn


def hf_run(b: Bench, gamma: int):
    sampler = sampler_for(b.args.mode, temperature=1.0)

    def fn(p, n, seed=0):
        run = dict(
            sampler=sampler, max_new_tokens=n, eos_ids=b.eos, seed=seed, pad_id=b.tok.eos_token_id
        )
        if gamma == 0:
            return hf_generate(b.target, p, **run)
        return hf_assisted(b.target, p, draft_model=b.draft_model, gamma=gamma, **run)

    return fn


def compare(b: Bench, gamma: int):
    """Alternate qspec and transformers prompt by prompt: (qspec Timed list, transformers
    Timings, compile seconds)."""
    ours, theirs = qspec_run(b, gamma), hf_run(b, gamma)
    t = time.perf_counter()
    ours(b.prompts[0], 8)  # warm-up (and compilation), not counted
    compile_s = time.perf_counter() - t
    theirs(b.prompts[0], 8)
    for timer in b.timers:
        timer.seconds = 0.0
    gens, hf = [], []
    for repeat in range(b.args.repeats):
        for i, p in enumerate(b.prompts):
            for timer in b.timers:
                timer.on = True
            g = ours(p, b.args.max_new_tokens, seed=i)
            gens.append(Timed(i, repeat, g.tokens, g.total_s, g))
            for timer in b.timers:
                timer.on = False
            toks, secs = theirs(p, b.args.max_new_tokens, seed=i)
            hf.append(Timed(i, repeat, toks, secs).timing)
    return gens, hf, compile_s


def rate(timings) -> float:
    return sum(t.tokens for t in timings) / sum(t.seconds for t in timings)


def ratio(num, den) -> str:
    """The paired geometric-mean ratio (measure/speedup.py) with its 95% interval."""
    r = PairedRatio.of(num, den)
    if r is None:
        return "-"
    ci = r.ci95
    return f"{r.mean:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def gamma_row(b: Bench, gamma: int, base, base_hf, bandwidth, weights) -> tuple[str, float]:
    gens, hf, compile_s = compare(b, gamma)
    ours = [t.timing for t in gens]
    forward_s = sum(t.seconds for t in b.timers)
    steps = [s for t in gens for s in t.gen.steps]
    prefills = sum(t.gen.prefill_s + t.gen.draft_prefill_s for t in gens)  # both prompt passes
    wall = sum(s.draft_s + s.verify_s for s in steps) + prefills
    overhead = 1 - forward_s / wall if wall and b.timers else float("nan")
    stats = Acceptance.of(steps, gamma)
    verify = roofline("verify", weights, [s.verify_s for s in steps if s.drafted], bandwidth)
    alpha = stats.alpha if stats.alpha is not None else float("nan")
    row = (
        f"{gamma:5d} | {rate(ours):11.2f} | {rate(hf):17.2f} | {ratio(ours, hf):18s} | "
        f"{ratio(ours, base):18s} | {ratio(hf, base_hf):18s} | {alpha:.3f} | {stats.tau:.2f} | "
        f"{overhead:8.1%} | {verify['step_s_p50'] * 1e3 if verify else float('nan'):13.2f} | "
        f"{verify['fraction'] if verify else float('nan'):15.1%}"
    )
    return row, compile_s


def main() -> None:
    args = parse_args()
    b = setup(args)
    bandwidth = copy_bandwidth(b.device)
    weights = weight_bytes(b.target)
    print(
        f"# {describe(b.device)} | model {args.model} | target {args.target} | draft "
        f"{args.draft} | mode {args.mode} | compile {'on' if b.compile else 'off'} | "
        f"{len(b.prompts)} prompts x {args.max_new_tokens} new tokens x {args.repeats} repeats"
    )
    if args.random:
        print("# RANDOM WEIGHTS: speed and roofline only; acceptance is meaningless here")
    print(
        f"# copy bandwidth {bandwidth['copy_gbps']:.1f} GB/s ({bandwidth['method']}); "
        f"target weights {weights / 2**20:.1f} MiB; ratios are paired per-prompt geometric "
        "means with 95% intervals"
    )
    gens, base_hf, compile_s = compare(b, 0)
    base = [t.timing for t in gens]
    steps = [s.verify_s for t in gens for s in t.gen.steps]
    decode = roofline("decode", weights, steps, bandwidth)
    print(
        f"target-only tokens/s: qspec {rate(base):.2f} | transformers generate {rate(base_hf):.2f}"
        f" | ratio {ratio(base, base_hf)} | kv cache {gens[0].gen.kv_path}"
    )
    print(
        f"target-only decode step p50 {decode['step_s_p50'] * 1e3:.2f} ms over "
        f"{decode['step_samples']} steps: {decode['achieved_gbps']:.1f} GB/s of weights = "
        f"{decode['fraction']:.1%} of copy bandwidth"
    )
    compile_times = [("target-only", compile_s)]
    print(
        "gamma | qspec tok/s | hf assisted tok/s | qspec/hf           | qspec speedup      | "
        "hf speedup         | alpha | tau | overhead | verify p50 ms | verify roofline"
    )
    for gamma in args.gammas:
        row, compile_s = gamma_row(b, gamma, base, base_hf, bandwidth, weights)
        print(row)
        compile_times.append((f"gamma {gamma}", compile_s))
    label = "compile + first 8-token warm-up" if b.compile else "first 8-token warm-up (eager)"
    print(
        f"# {label}, never in the figures above: "
        + ", ".join(f"{name} {s:.1f} s" for name, s in compile_times)
        + f" (median {statistics.median(s for _, s in compile_times):.1f} s)"
    )


if __name__ == "__main__":
    main()

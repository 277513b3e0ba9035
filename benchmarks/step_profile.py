"""Where a decode step's time goes, for one pairing: a script, not a test.

For the target's one-token decode step (and, with --draft, the draft's step and the
(gamma+1)-token verify) it prints the step's wall time and, from torch's profiler, the share
of it spent in linear layers, attention, cache writes, norms and other elementwise ops, the
LM head, and outside any op (Python and dispatch); the kernels each share ran on; the
weights read per step against the machine's read and copy bandwidth; and the thread and
kernel settings torch runs with. The profiler's own overhead inflates the op times, so the
shares come from the profiled steps and the wall times from unprofiled ones.

    python benchmarks/step_profile.py --target fp32
    python benchmarks/step_profile.py --target fp32 --draft gptq-int4 --gamma 3
    python benchmarks/step_profile.py --target int8 --compile on
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from qspec.engine.compiled import Compiled
from qspec.engine.kv import new_kv
from qspec.environment import pick_device
from qspec.measure.roofline import copy_bandwidth, read_bandwidth
from qspec.models.builders import BuildContext, build, weight_bytes
from qspec.models.refs import resolve
from qspec.runner import calibration_texts
from qspec.suites.discovery import load_suite

# profiler op name -> share of the step it belongs to (first match wins); the rest is "other"
CATEGORIES = (
    ("attention", ("scaled_dot_product", "attention", "softmax", "baddbmm", "bmm")),
    ("cache writes", ("index_copy", "index_put", "copy_")),
    ("linear", ("linear", "addmm", "aten::mm", "matmul", "gemm", "int8", "int4", "gptq", "bnb")),
    ("norms and elementwise", ("mul", "add", "pow", "mean", "rsqrt", "silu", "neg", "cat")),
    ("embedding", ("embedding",)),
)


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--target", default="fp32")
    ap.add_argument("--draft", default=None, help="a draft precision of the same model")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per forward kind")
    ap.add_argument("--compile", default="off", choices=["on", "off"])
    ap.add_argument("--device", default="auto")
    return ap.parse_args()


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def timed_steps(kv, ids: torch.Tensor, steps: int, device) -> list[float]:
    """Wall seconds of `steps` forwards of ids after the cache's context (rolled back each)."""
    start = kv.length
    out = []
    for _ in range(steps + 2):  # two untimed: first-call setup
        t = time.perf_counter()
        kv.forward(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t)
        kv.rollback(start)
    return out[2:]


def profiled(kv, ids: torch.Tensor, steps: int) -> dict:
    """Per category: self CPU time share and the kernels (op names) that took the most."""
    start = kv.length
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            kv.forward(ids)
            kv.rollback(start)
    by_cat: dict[str, float] = defaultdict(float)
    kernels: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in prof.key_averages():
        cat = category(e.key)
        by_cat[cat] += e.self_cpu_time_total
        kernels[cat][e.key] += e.self_cpu_time_total
    return {"self_us": dict(by_cat), "kernels": kernels, "steps": steps}


def report(title: str, wall: list[float], prof: dict, weights: int, bw: dict) -> None:
    p50 = statistics.median(wall)
    per = prof["steps"]  # op times are summed over the profiled steps
    self_total = sum(prof["self_us"].values()) / 1e6 / per
    print(f"\n{title}: p50 {p50 * 1e3:.1f} ms over {len(wall)} steps")
    shares = {c: s / 1e6 / per for c, s in prof["self_us"].items()}
    # time outside every op's self time: Python, dispatch, the profiler's own bookkeeping
    outside = max(0.0, p50 - self_total)
    rows = sorted(shares.items(), key=lambda kv: -kv[1]) + [("outside ops (Python)", outside)]
    total = sum(s for _, s in rows) or 1.0
    for cat, secs in rows:
        top = sorted(prof["kernels"].get(cat, {}).items(), key=lambda kv: -kv[1])[:3]
        names = ", ".join(k for k, _ in top)
        print(f"  {cat:24s} {100 * secs / total:5.1f}%  {names}")
    read = weights / p50 / 1e9
    print(
        f"  weights {weights / 2**20:.0f} MiB per step: {read:.1f} GB/s = "
        f"{100 * read / bw['read_gbps']:.0f}% of read bandwidth ({bw['read_gbps']:.1f} GB/s), "
        f"{100 * read / bw['copy_gbps']:.0f}% of copy bandwidth ({bw['copy_gbps']:.1f} GB/s)"
    )


def settings() -> str:
    cpu = torch.backends.cpu.get_cpu_capability()
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"({torch.get_num_interop_threads()} inter-op), CPU capability {cpu}, "
        f"mkldnn {torch.backends.mkldnn.is_available()}, mkl {torch.backends.mkl.is_available()}"
    )


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    location = resolve(args.model).location
    ctx = BuildContext(location, device.type, calibration_texts=calibration_texts([]))
    if args.target == "gptq-int4" or args.draft == "gptq-int4":
        ctx.calibration_texts = calibration_texts([load_suite("default")])
    bw = {**copy_bandwidth(device), **read_bandwidth(device)}
    print(settings())
    print(f"copy bandwidth {bw['copy_gbps']:.1f} GB/s, read bandwidth {bw['read_gbps']:.1f} GB/s")
    pairs = [("target", args.target)] + ([("draft", args.draft)] if args.draft else [])
    with torch.inference_mode():
        for role, precision in pairs:
            model = build(precision, ctx)
            compiled = Compiled(model) if args.compile == "on" else None
            kv = new_kv(model, args.context + args.gamma + 8, compiled)
            context = torch.randint(100, 1000, (args.context,), device=device)
            kv.forward(context, last_only=True)
            one = context[-1:]
            kinds = [(f"{role} {precision} decode step (1 token)", one)]
            if role == "target" and args.draft:
                kinds.append(
                    (
                        f"target {precision} verify ({args.gamma + 1} tokens)",
                        context[: args.gamma + 1],
                    )
                )
            for title, ids in kinds:
                wall = timed_steps(kv, ids, args.steps, device)
                prof = profiled(kv, ids, max(4, args.steps // 3))
                report(title, wall, prof, weight_bytes(model), bw)
            del model, kv


if __name__ == "__main__":
    main()

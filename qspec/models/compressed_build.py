"""The compressed-tensors precisions (w8a8, fp8, w4a16, awq-w4a16): built once by llm-compressor
in the quantization venv (llmc_build.py, run as a subprocess: its pins cannot share qspec's
venv), cached like a GPTQ build, and loaded with the scheme's numerics (compressed.py).

The same calibration text as the GPTQ build (the run's calibration texts, hash recorded by the
script); the recipe and the library versions travel in the checkpoint's llmc-build.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from qspec import cache

SCRIPT = Path(__file__).with_name("llmc_build.py")
DEFAULT_VENV = Path(".venvs") / "quant"
FIX = (
    "run `nox -s quant`, which installs llm-compressor into .venvs/quant, or set QSPEC_QUANT_PYTHON"
)
# bump when the build script's recipes change what a cached checkpoint holds
RECIPES = 2
TIMEOUT_S = 3600


def quant_python() -> Path:
    """The quantization venv's interpreter: $QSPEC_QUANT_PYTHON, else the noxfile's venv."""
    raw = os.environ.get("QSPEC_QUANT_PYTHON") or str(DEFAULT_VENV / "bin" / "python")
    return Path(raw).expanduser()


def quant_problem() -> str | None:
    """None when llm-compressor runs from the quantization venv, else what is wrong and the fix."""
    python = quant_python()
    if not python.exists():
        return f"{python} does not exist ({FIX})"
    check = "import importlib.metadata as m; print(m.version('llmcompressor'))"
    try:
        out = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    except OSError as err:
        return f"{python} cannot run ({err}; {FIX})"
    if out.returncode != 0:
        return f"llm-compressor is not installed for {python} ({FIX})"
    return None


def compressed_entry(location: str, scheme: str, texts: list[str]) -> Path:
    blob = json.dumps([RECIPES, location, scheme, texts if scheme != "fp8" else []])
    return cache.entry_dir("compressed", hashlib.sha256(blob.encode()).hexdigest()[:16])


def built_folder(location: str, scheme: str, texts: list[str]) -> Path:
    """The checkpoint folder of this model and scheme, built here on first use."""
    out = compressed_entry(location, scheme, texts)
    with cache.building(out) as missing:
        if missing:
            problem = quant_problem()
            if problem:
                raise RuntimeError(f"{scheme} needs llm-compressor: {problem}")
            with cache.atomic_dir(out) as tmp:
                _run(location, scheme, texts, tmp)
                source = {"model": location, "scheme": scheme, "builder": "llm-compressor"}
                (tmp / cache.SOURCE).write_text(json.dumps(source))
    cache.touch(out)
    cache.enforce_limit(keep=out)
    return out


def _run(location: str, scheme: str, texts: list[str], tmp: Path) -> None:
    calib = tmp / "calibration.json"
    calib.write_text(json.dumps(texts))
    ckpt = tmp / "build"
    cmd = [str(quant_python()), str(SCRIPT), "--model", location, "--scheme", scheme]
    cmd += ["--calibration", str(calib), "--out", str(ckpt), "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"llm-compressor's {scheme} build failed: {' | '.join(tail)}")
    calib.unlink()
    for f in ckpt.iterdir():  # the checkpoint's files at the entry's top level
        f.rename(tmp / f.name)
    ckpt.rmdir()


def saved(location: str, scheme: str, texts: list[str]) -> Path | None:
    out = compressed_entry(location, scheme, texts)
    return out if (out / cache.SOURCE).exists() else None

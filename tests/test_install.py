"""A wheel, not the source tree: built-in suites must ship inside the package.

Builds the wheel, installs it (without dependencies) into a fresh virtual environment
that borrows this environment's site-packages through a .pth file, and runs `qspec
suites` from a folder outside the repository. Directories a .pth file adds are not
scanned for .pth files themselves, so this environment's editable qspec cannot shadow
the wheel; the test checks that too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE_FILES = {
    "default/suite.toml",
    "standard/suite.toml",
    "example-custom/suite.toml",
    "example-custom/prompts.jsonl",
    "example-custom/corpus/garden-handbook.txt",
    "example-custom/data/garden_mc.jsonl",
    "example-custom/tasks/garden_mc.yaml",
}


def _run(args: list, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _wheel(tmp_path: Path) -> Path:
    """Build from a copy of the sources, so the build leaves nothing in the working tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("qspec", "suites"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*pip, "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("qspec-*.whl")
    return wheel


def test_installed_wheel_ships_and_finds_the_builtin_suites(tmp_path):
    import zipfile

    wheel = _wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"qspec/builtin_suites/{f}" for f in SUITE_FILES} <= names
    packages = {
        p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "qspec").rglob("__init__.py")
    }
    assert {f"{p}/__init__.py" for p in packages} <= names, "a package missing from pyproject.toml"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
        ).strip()
    )
    (site / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    _run([*pip, "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "QSPEC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("QSPEC_SUITES_PATH", None)
    env.pop("PYTHONPATH", None)
    where = _run([python, "-c", "import qspec; print(qspec.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's, not the source tree's

    out = _run([env_dir / "bin" / "qspec", "suites"], elsewhere, env)
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert {"default", "standard", "example-custom"} <= set(rows), out
    assert "BROKEN" not in out, out
    assert str(site / "qspec" / "builtin_suites" / "default") in rows["default"], out
    assert "corpus, prompts, tasks" in rows["default"], out

"""Task suites: where an evaluation gets its corpus text, prompts and lm-eval tasks.

A suite is a folder holding ``suite.toml`` plus data files (folder.py reads one). Suites are
found, first match wins for a name: paths given explicitly, directories on
``QSPEC_SUITES_PATH``, the built-in suites (the top-level ``suites/`` folder, shipped in the
wheel as ``qspec/builtin_suites/``), then installed packages exposing the entry point group
``qspec.suites``. Only this module's light imports run during discovery.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qspec.suites.files import SUITE_FILE, SuiteError
from qspec.suites.folder import Suite, load_suite_dir, toml_name

ENV_VAR = "QSPEC_SUITES_PATH"
ENTRY_POINT_GROUP = "qspec.suites"


@dataclass
class SuiteSummary:
    """One line of `qspec suites`: enough to choose a suite, and why a broken one is broken.

    Shares `name`, `origin`, `path`, `description`, `requires_hub` and `declares()`
    with Suite so callers can print either.
    """

    name: str
    origin: str
    path: Path
    declared: list[str] = field(default_factory=list)
    description: str = ""
    requires_hub: bool = False
    n_prompts: int = 0
    categories: list[str] = field(default_factory=list)
    n_task_files: int = 0
    task_names: list[str] = field(default_factory=list)
    corpus: str = ""
    error: str | None = None

    def declares(self) -> list[str]:
        return list(self.declared)


# ---------------------------------------------------------------- helpers


def builtin_suites_dir() -> Path:
    """The built-in suites: the top-level suites/ folder, shipped in the wheel as the package
    data qspec.builtin_suites (pyproject.toml maps one to the other)."""
    spec = importlib.util.find_spec("qspec.builtin_suites")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(__file__).resolve().parents[2] / "suites"  # a checkout on sys.path, uninstalled


def _suites_in(directory: Path) -> list[Path]:
    """A suite folder itself, or the suite folders directly inside a directory."""
    directory = Path(directory)
    if (directory / SUITE_FILE).is_file():
        return [directory.resolve()]
    if not directory.is_dir():
        return []
    return sorted(p.resolve() for p in directory.iterdir() if (p / SUITE_FILE).is_file())


def _entry_point_dir(ep: importlib.metadata.EntryPoint) -> Path | None:
    """Folder of an entry-point suite: the module's package folder, or what an attribute gives."""
    if ep.attr:
        obj = ep.load()
        obj = obj() if callable(obj) else obj
        return Path(obj) if isinstance(obj, str | os.PathLike) else None
    spec = importlib.util.find_spec(ep.module)
    if spec is None or spec.origin is None:
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        return None
    return Path(spec.origin).parent


def _entry_points() -> list[tuple[str, Path | None, str, str | None]]:
    """(name, folder, origin, error) for each `qspec.suites` entry point."""
    out = []
    for ep in sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
    ):
        dist = getattr(ep, "dist", None)
        origin = f"entry point {dist.name if dist is not None else ep.value}"
        try:
            folder = _entry_point_dir(ep)
            error = None if folder else f"entry point {ep.value!r} gave no folder"
        except Exception as exc:  # a broken third-party package must not break discovery
            folder, error = None, f"entry point {ep.value!r} failed: {type(exc).__name__}: {exc}"
        out.append((ep.name, folder, origin, error))
    return out


def discover_suites(extra_paths: Sequence[Path] = ()) -> dict[str, tuple[Path, str]]:
    """Map suite name -> (folder, origin); earlier sources win for the same name.

    Sources in order: `extra_paths` ("path"), QSPEC_SUITES_PATH, the package's
    builtin_suites/ folder ("builtin"), entry points ("entry point <dist>"). Each path
    may be a suite folder or a directory of suite folders. Nothing is validated here.
    """
    found: dict[str, tuple[Path, str]] = {}

    def add(name: str, folder: Path, origin: str) -> None:
        found.setdefault(name, (folder, origin))

    for path in extra_paths:
        for folder in _suites_in(Path(path)):
            add(toml_name(folder), folder, "path")
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            for folder in _suites_in(Path(entry).expanduser()):
                add(toml_name(folder), folder, ENV_VAR)
    for folder in _suites_in(builtin_suites_dir()):
        add(toml_name(folder), folder, "builtin")
    for name, folder, origin, _error in _entry_points():
        if folder is not None:
            add(name, folder, origin)
    return found


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(".toml") or text.startswith(".")


def load_suite(name_or_path: str | Path, extra_paths: Sequence[Path] = ()) -> Suite:
    """Load a suite by name (see discover_suites) or by folder / suite.toml path."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.name == SUITE_FILE and candidate.is_file():
        candidate = candidate.parent
    if (candidate / SUITE_FILE).is_file() and (
        isinstance(name_or_path, Path) or _looks_like_path(text)
    ):
        return load_suite_dir(candidate, "path")
    found = discover_suites(extra_paths)
    if text in found:
        folder, origin = found[text]
        suite = load_suite_dir(folder, origin)
        suite.name = text  # an entry point's name wins over the toml's
        return suite
    if (candidate / SUITE_FILE).is_file():
        return load_suite_dir(candidate, "path")
    if isinstance(name_or_path, Path) or _looks_like_path(text):
        raise SuiteError(f"{text}: no {SUITE_FILE} there")
    known = ", ".join(sorted(found)) or "none"
    raise SuiteError(f"unknown suite {text!r} (known suites: {known})")


def list_suites(extra_paths: Sequence[Path] = ()) -> list[SuiteSummary]:
    """Every discoverable suite, loaded and validated; broken ones carry their error."""
    rows = []
    found = discover_suites(extra_paths)
    for name, (folder, origin) in sorted(found.items()):
        row = SuiteSummary(name=name, origin=origin, path=folder)
        try:
            suite = load_suite_dir(folder, origin)
        except SuiteError as exc:
            row.error = str(exc)
        else:
            row.declared = suite.declares()
            row.description = suite.description
            row.requires_hub = suite.requires_hub
            row.n_prompts = len(suite.prompts)
            row.categories = sorted({p.category for p in suite.prompts})
            row.n_task_files = len(suite.task_files)
            row.task_names = suite.task_names
            if suite.corpus_callable:
                row.corpus = f"callable {suite.corpus_callable}"
            elif suite.corpus_files:
                row.corpus = f"{len(suite.corpus_files)} file(s)"
        rows.append(row)
    for name, folder, origin, error in _entry_points():
        if folder is None and name not in found:
            rows.append(SuiteSummary(name=name, origin=origin, path=Path(), error=error))
    return rows

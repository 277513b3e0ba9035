"""Reading a suite's files: the error every suite problem raises, naming the file (and line),
and paths shown as the user would type them. Shared by folder.py and task_yaml.py."""

from __future__ import annotations

from pathlib import Path

SUITE_FILE = "suite.toml"


class SuiteError(ValueError):
    """A suite that cannot be used; the message names the file (and line) and the problem."""


def show(path: Path) -> str:
    """Path as the user would type it: relative to the working directory when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{show(path)}: not valid UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise SuiteError(f"{show(path)}: cannot read ({exc.strerror or exc})") from exc

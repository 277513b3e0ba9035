"""Local lm-eval task YAMLs of a suite: read safely, includes merged, data paths made absolute.

lm-eval resolves a relative `data_files` path against the working directory, so a suite's
task would only load from inside its own folder; task_config and materialize_task_yaml give
lm-eval a copy that loads from anywhere.
"""

from __future__ import annotations

import glob
from pathlib import Path

from qspec.suites.files import SUITE_FILE, SuiteError, read_text, show


def _yaml_loader():
    """A safe YAML loader that refuses `!function` (suite files must not run code)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def refuse(loader, tag_suffix, node):
        raise SuiteError(
            f"uses the YAML tag !{tag_suffix} at line {node.start_mark.line + 1}; "
            "code in task files is not supported (use Jinja templates or field names)"
        )

    Loader.add_multi_constructor("!", refuse)
    return Loader


def read_task_yaml(path: Path, _seen: frozenset = frozenset()) -> dict:
    """Load a local lm-eval task YAML with its `include`s merged in, as lm-eval does."""
    import yaml

    path = Path(path).resolve()
    if path in _seen:
        raise SuiteError(f"{show(path)}: include cycle")
    if not path.is_file():
        raise SuiteError(f"{show(path)}: task file not found")
    try:
        cfg = yaml.load(read_text(path), Loader=_yaml_loader())  # noqa: S506 (SafeLoader subclass)
    except SuiteError as exc:
        raise SuiteError(f"{show(path)}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{show(path)}: not valid YAML ({exc})") from exc
    if not isinstance(cfg, dict):
        raise SuiteError(f"{show(path)}: expected a YAML mapping (an lm-eval task config)")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str):
            raise SuiteError(f"{show(path)}: include entries must be file paths")
        inc_cfg = read_task_yaml(path.parent / inc, _seen | {path})
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    merged.update(cfg)
    return merged


def _find_suite_dir(path: Path) -> Path | None:
    for parent in Path(path).resolve().parents:
        if (parent / SUITE_FILE).is_file():
            return parent
    return None


def _resolve_data_file(value: str, yaml_path: Path, suite_dir: Path | None) -> str:
    """Absolute form of one data_files entry: against the YAML's folder, then the suite folder."""
    if "://" in value or Path(value).is_absolute():
        return value
    bases = [Path(yaml_path).resolve().parent]
    if suite_dir is not None:
        bases.append(Path(suite_dir).resolve())
    for base in bases:
        candidate = base / value
        if glob.glob(str(candidate)):
            return str(candidate)
    raise SuiteError(
        f"{show(yaml_path)}: data file {value!r} not found "
        f"(looked in {', '.join(show(b) for b in bases)})"
    )


def _absolute_data_files(data_files: object, yaml_path: Path, suite_dir: Path | None) -> object:
    if isinstance(data_files, str):
        return _resolve_data_file(data_files, yaml_path, suite_dir)
    if isinstance(data_files, list):
        return [_absolute_data_files(v, yaml_path, suite_dir) for v in data_files]
    if isinstance(data_files, dict):
        return {k: _absolute_data_files(v, yaml_path, suite_dir) for k, v in data_files.items()}
    raise SuiteError(f"{show(yaml_path)}: data_files must be a path, a list or a mapping")


def task_config(yaml_path: Path, suite_dir: Path | None = None) -> dict:
    """A local task's config with includes merged and data_files made absolute."""
    cfg = read_task_yaml(yaml_path)
    if not isinstance(cfg.get("task"), str) and "group" not in cfg:
        raise SuiteError(f"{show(yaml_path)}: expected a 'task' name (an lm-eval task config)")
    suite_dir = suite_dir if suite_dir is not None else _find_suite_dir(yaml_path)
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        kwargs = dict(kwargs)
        kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], yaml_path, suite_dir)
        cfg["dataset_kwargs"] = kwargs
    return cfg


def materialize_task_yaml(yaml_path: Path, out_dir: Path, suite_dir: Path | None = None) -> Path:
    """Write a copy of a local task YAML that lm-eval can load from anywhere.

    lm-eval resolves relative `data_files` against the working directory, not the
    YAML's folder, so relative paths are made absolute here (against the YAML's
    folder, else the suite folder) and `include`s are merged in. Returns the new path.
    """
    import yaml

    cfg = task_config(yaml_path, suite_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / Path(yaml_path).name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out

"""One suite folder: suite.toml and its data files, read and validated (TOML keys, file
existence, every JSONL line, task YAMLs) so a malformed suite fails before any model loads."""

from __future__ import annotations

import glob
import importlib
import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qspec.plan import SuitePlan
from qspec.suites.files import SUITE_FILE, SuiteError, read_text, show
from qspec.suites.task_yaml import task_config

SUITE_KEYS = ("corpus", "description", "name", "prompts", "requires_hub", "tasks")
PROMPT_FIELDS = ("category", "id", "max_new_tokens", "messages", "prompt")
YAML_SUFFIXES = (".yaml", ".yml")
GLOB_CHARS = set("*?[")


@dataclass
class Prompt:
    id: str
    category: str
    prompt: str | None = None
    messages: list[dict] | None = None
    max_new_tokens: int | None = None


@dataclass
class Suite:
    name: str
    path: Path
    origin: str
    description: str = ""
    requires_hub: bool = False
    prompts: list[Prompt] = field(default_factory=list)
    task_files: list[Path] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    corpus_files: list[Path] = field(default_factory=list)
    corpus_callable: str | None = None
    _corpus: list[str] | None = field(default=None, repr=False, compare=False)

    def corpus(self) -> list[str]:
        """Corpus documents (cached). Files are read at load; a callable runs on first use."""
        if self._corpus is None:
            if self.corpus_callable:
                self._corpus = _call_corpus(self.corpus_callable, self.path / SUITE_FILE)
            else:
                self._corpus = [read_text(p) for p in self.corpus_files]
        return self._corpus

    def declares(self) -> list[str]:
        """Which parts this suite supplies, so a run can skip stages it has no input for."""
        out = []
        if self.corpus_files or self.corpus_callable:
            out.append("corpus")
        if self.prompts:
            out.append("prompts")
        if self.task_files or self.task_names:
            out.append("tasks")
        return out

    def generative_task(self) -> str | None:
        """The first local generate_until task (multiple choice generates nothing to check)."""
        for path in self.task_files:
            try:
                conf = task_config(path)
            except Exception:  # noqa: BLE001 - a broken task file is the task stage's to report
                continue
            if conf.get("output_type") == "generate_until":
                return conf.get("task")
        return None

    def plan(self) -> SuitePlan:
        """What planning needs of this suite (plan.py is torch-free and never loads one)."""
        tasks = bool(self.task_files or self.task_names)
        return SuitePlan(self.name, tasks, self.generative_task() if tasks else None)


def _resolve_callable(ref: object, where: str):
    """Import `module:function` (a dotted attribute path is allowed after the colon)."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise SuiteError(f"{where}: callable must be a string 'module:function', got {ref!r}")
    module_name, attr = ref.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise SuiteError(f"{where}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise SuiteError(f"{where}: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise SuiteError(f"{where}: {ref!r} is not callable")
    return obj


def _call(ref: str, where: str):
    func = _resolve_callable(ref, where)
    try:
        return func()
    except SuiteError:
        raise
    except Exception as exc:
        raise SuiteError(f"{where}: callable {ref!r} failed: {type(exc).__name__}: {exc}") from exc


def _callable_ref(value: object, key: str, where: str) -> str | None:
    """The 'module:function' of a `{ callable = ... }` table, or None for a plain value."""
    if not isinstance(value, dict):
        return None
    if set(value) != {"callable"}:
        raise SuiteError(
            f"{where}: {key} table must have exactly one key 'callable', got {sorted(value)}"
        )
    ref = value["callable"]
    _resolve_callable(ref, f"{where}: {key}")
    return ref


def _call_corpus(ref: str, toml_path: Path) -> list[str]:
    where = f"{show(toml_path)}: corpus"
    result = _call(ref, where)
    if isinstance(result, str):
        raise SuiteError(f"{where}: callable {ref!r} returned a single str, expected documents")
    try:
        docs = list(result)
    except TypeError as exc:
        raise SuiteError(f"{where}: callable {ref!r} returned a non-iterable") from exc
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise SuiteError(f"{where}: document {i} from {ref!r} is {type(doc).__name__}, not str")
    return docs


# ---------------------------------------------------------------- prompts


def parse_prompt(obj: object, where: str) -> Prompt:
    """Check one prompt record (from a JSONL line or a callable) and build a Prompt."""
    if not isinstance(obj, dict):
        raise SuiteError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(PROMPT_FIELDS))
    if unknown:
        raise SuiteError(
            f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(PROMPT_FIELDS)})"
        )
    for key in ("id", "category"):
        if key not in obj:
            raise SuiteError(f"{where}: missing required field {key!r}")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise SuiteError(f"{where}: field {key!r} must be a non-empty string")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise SuiteError(
            f"{where}: prompt {obj['id']!r} needs exactly one of 'prompt' or 'messages'"
            + (", got both" if has_prompt else ", got neither")
        )
    if has_prompt and not isinstance(obj["prompt"], str):
        raise SuiteError(f"{where}: field 'prompt' must be a string")
    if has_messages:
        _check_messages(obj["messages"], where)
    limit = obj.get("max_new_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SuiteError(f"{where}: field 'max_new_tokens' must be a positive integer")
    return Prompt(
        id=obj["id"],
        category=obj["category"],
        prompt=obj.get("prompt"),
        messages=obj.get("messages"),
        max_new_tokens=limit,
    )


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise SuiteError(f"{where}: field 'messages' must be a non-empty list of chat messages")
    for i, msg in enumerate(messages):
        if (
            not isinstance(msg, dict)
            or set(msg) != {"role", "content"}
            or not isinstance(msg["role"], str)
            or not isinstance(msg["content"], str)
        ):
            raise SuiteError(
                f"{where}: messages[{i}] must be an object with string 'role' and 'content' only"
            )


def _check_unique(items: Iterable[tuple[Prompt, str]]) -> list[Prompt]:
    """Prompt ids key results across runs, so they must be unique within a suite."""
    seen: dict[str, str] = {}
    for prompt, where in items:
        if prompt.id in seen:
            raise SuiteError(f"{where}: duplicate id {prompt.id!r} (first at {seen[prompt.id]})")
        seen[prompt.id] = where
    return [prompt for prompt, _ in items]


def load_prompts_jsonl(path: Path) -> list[Prompt]:
    """Parse and check every line of a prompts JSONL file (blank lines are skipped)."""
    text = read_text(path)
    parsed = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{show(path)} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"{where}: not valid JSON ({exc})") from exc
        parsed.append((parse_prompt(obj, where), where))
    if not parsed:
        raise SuiteError(f"{show(path)}: no prompts in file")
    return _check_unique(parsed)


def _prompts_from_callable(ref: str, toml_path: Path) -> list[Prompt]:
    where = f"{show(toml_path)}: prompts from {ref!r}"
    result = _call(ref, where)
    if isinstance(result, dict | str) or not isinstance(result, Iterable):
        raise SuiteError(f"{where}: expected a list of prompt dicts")
    items = [
        (parse_prompt(obj, f"{where} item {i}"), f"{where} item {i}")
        for i, obj in enumerate(result)
    ]
    if not items:
        raise SuiteError(f"{where}: returned no prompts")
    return _check_unique(items)


# ---------------------------------------------------------------- suite.toml


def _corpus_files(value: object, suite_dir: Path, where: str) -> list[Path]:
    entries = value if isinstance(value, list) else [value]
    files: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise SuiteError(f"{where}: corpus entries must be file paths or globs, got {entry!r}")
        if GLOB_CHARS & set(entry):
            matches = sorted(Path(p) for p in glob.glob(str(suite_dir / entry), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise SuiteError(f"{where}: corpus pattern {entry!r} matched no files")
            files.extend(matches)
        else:
            path = suite_dir / entry
            if not path.is_file():
                raise SuiteError(f"{where}: corpus file {entry!r} not found")
            files.append(path)
    return files


def _tasks(value: object, suite_dir: Path, toml_path: Path) -> tuple[list[Path], list[str]]:
    where = show(toml_path)
    ref = _callable_ref(value, "tasks", where)
    if ref is not None:
        result = _call(ref, f"{where}: tasks")
        if isinstance(result, str | Path) or not isinstance(result, Iterable):
            raise SuiteError(f"{where}: tasks callable {ref!r} must return a list of YAML paths")
        files = [Path(p).resolve() for p in result]
        for path in files:
            if not path.is_file():
                raise SuiteError(f"{where}: task file {str(path)!r} from {ref!r} not found")
        names: list[str] = []
    else:
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list):
            raise SuiteError(f"{where}: tasks must be a list of YAML files or task names")
        files, names = [], []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise SuiteError(f"{where}: task entries must be non-empty strings, got {entry!r}")
            if entry.endswith(YAML_SUFFIXES):
                path = (suite_dir / entry).resolve()
                if not path.is_file():
                    raise SuiteError(f"{where}: task file {entry!r} not found")
                files.append(path)
            else:
                names.append(entry)
    seen: dict[str, Path] = {}
    for path in files:
        cfg = task_config(path, suite_dir)
        task = cfg.get("task") or cfg.get("group")
        if isinstance(task, str):
            if task in seen:
                raise SuiteError(
                    f"{show(path)}: task name {task!r} also defined in {show(seen[task])}"
                )
            seen[task] = path
    return files, names


def _read_toml(toml_path: Path) -> dict:
    try:
        return tomllib.loads(read_text(toml_path))
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{show(toml_path)}: not valid TOML ({exc})") from exc


def load_suite_dir(suite_dir: Path, origin: str) -> Suite:
    """Load and fully validate the suite in `suite_dir`."""
    suite_dir = Path(suite_dir).resolve()
    toml_path = suite_dir / SUITE_FILE
    if not toml_path.is_file():
        raise SuiteError(f"{show(toml_path)}: not found (a suite folder needs a {SUITE_FILE})")
    where = show(toml_path)
    data = _read_toml(toml_path)
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        raise SuiteError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(SUITE_KEYS)})")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise SuiteError(f"{where}: {key!r} must be a string")
    if "requires_hub" in data and not isinstance(data["requires_hub"], bool):
        raise SuiteError(f"{where}: 'requires_hub' must be true or false")
    suite = Suite(
        name=data.get("name") or suite_dir.name,
        path=suite_dir,
        origin=origin,
        description=data.get("description", ""),
        requires_hub=data.get("requires_hub", False),
    )
    if "corpus" in data:
        suite.corpus_callable = _callable_ref(data["corpus"], "corpus", where)
        if suite.corpus_callable is None:
            suite.corpus_files = _corpus_files(data["corpus"], suite_dir, where)
            suite.corpus()  # files are read now so a bad encoding fails before any model loads
    if "prompts" in data:
        ref = _callable_ref(data["prompts"], "prompts", where)
        if ref is not None:
            suite.prompts = _prompts_from_callable(ref, toml_path)
        elif isinstance(data["prompts"], str):
            path = suite_dir / data["prompts"]
            if not path.is_file():
                raise SuiteError(f"{where}: prompts file {data['prompts']!r} not found")
            suite.prompts = load_prompts_jsonl(path)
        else:
            raise SuiteError(f"{where}: prompts must be a JSONL file path or {{ callable = ... }}")
    if "tasks" in data:
        suite.task_files, suite.task_names = _tasks(data["tasks"], suite_dir, toml_path)
    if not suite.declares():
        raise SuiteError(f"{where}: declares none of corpus, prompts, tasks")
    return suite


# ---------------------------------------------------------------- discovery


def toml_name(suite_dir: Path) -> str:
    """The suite's declared name, or its folder name (errors surface later, at load)."""
    try:
        name = tomllib.loads((suite_dir / SUITE_FILE).read_text(encoding="utf-8")).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        name = None
    return name if isinstance(name, str) and name else suite_dir.name

"""Content of the built-in `default` suite, generated at run time.

Everything here is derived from text that ships with the running Python
(``pydoc_data.topics`` and standard library source files), so the default
suite works offline and nothing third-party is copied into the repository.
Selections are fixed lists and seeded choices: the same Python version always
yields the same corpus, prompts and task data.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import random
import sysconfig
from pathlib import Path

from qspec import cache

# Documentation topics that go into the corpus (short, prose-heavy ones).
CORPUS_TOPICS = [
    "assert",
    "booleans",
    "break",
    "continue",
    "del",
    "for",
    "global",
    "if",
    "lambda",
    "nonlocal",
    "pass",
    "raise",
    "return",
    "truth",
    "while",
    "with",
    "yield",
]
# Small standard library modules whose source goes into the corpus.
CORPUS_MODULES = ["bisect", "colorsys", "fnmatch"]

# (module, function) pairs for code-completion prompts.
CODE_FUNCTIONS = [
    ("textwrap", "indent"),
    ("textwrap", "shorten"),
    ("string", "capwords"),
    ("statistics", "median"),
    ("statistics", "mode"),
    ("json", "loads"),
    ("fnmatch", "filter"),
    ("bisect", "insort_right"),
]

# (topic, question) pairs for question answering over a documentation excerpt.
QA_QUESTIONS = [
    ("while", "When is the suite of the else clause of a while loop executed?"),
    ("break", "What value does the loop variable of a for loop have after break?"),
    ("assert", "What happens to assert statements when Python runs with -O?"),
    ("lambda", "What can a function created by a lambda expression not contain?"),
    ("nonlocal", "How do names in a nonlocal statement differ from names in a global one?"),
    ("return", "What does a return statement inside a generator function cause?"),
]

# Topics to summarise.
SUMMARY_TOPICS = ["with", "truth", "del", "global", "continue"]

# Modules used for the multiple-choice task (which function does this docstring describe?).
MC_MODULES = [
    "base64",
    "calendar",
    "difflib",
    "functools",
    "heapq",
    "inspect",
    "json",
    "os",
    "platform",
    "posixpath",
    "pprint",
    "shutil",
    "statistics",
    "tempfile",
    "urllib.parse",
    "warnings",
]
MC_PER_MODULE = 6

# Modules used for the generative task (finish the imported name).
IMPORT_MODULES = [
    "argparse",
    "calendar",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "difflib",
    "email.utils",
    "enum",
    "functools",
    "http.client",
    "inspect",
    "io",
    "logging",
    "mimetypes",
    "pathlib",
    "pickle",
    "queue",
    "shutil",
    "statistics",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "traceback",
    "typing",
    "unittest",
    "weakref",
    "zipfile",
]
IMPORT_PER_MODULE = 3

MC_TASK = "qspec_default_docname"
GEN_TASK = "qspec_default_import"
MAX_EXCERPT_CHARS = 1400


@functools.cache
def module_source(module: str) -> str:
    """Source text of a pure-Python stdlib module, read from disk without importing it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rel = Path(*module.split("."))
    for candidate in (stdlib / rel.with_suffix(".py"), stdlib / rel / "__init__.py"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise FileNotFoundError(f"no Python source found for stdlib module {module!r}")
    return Path(spec.origin).read_text(encoding="utf-8")


def topic_text(topic: str) -> str | None:
    """Text of one pydoc topic, or None when this Python version lacks it."""
    from pydoc_data.topics import topics

    text = topics.get(topic)
    return text.strip() if text else None


def excerpt(text: str, limit: int = MAX_EXCERPT_CHARS) -> str:
    """Leading paragraphs of `text` that fit in `limit` characters (keeps prompts short)."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    if cut < limit // 3:
        cut = text.rfind(" ", 0, limit)
    return text[: max(cut, 1)].rstrip()


def corpus() -> list[str]:
    """Corpus documents: selected pydoc topics, then a few small stdlib modules' source."""
    docs = [t for t in (topic_text(name) for name in CORPUS_TOPICS) if t]
    docs += [module_source(name) for name in CORPUS_MODULES]
    return docs


@functools.cache
def _tree(module: str) -> ast.Module:
    return ast.parse(module_source(module))


def _top_level_functions(module: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in _tree(module).body if isinstance(n, ast.FunctionDef)}


def _function_head(module: str, name: str) -> str | None:
    """The real `def` line(s) and docstring of a stdlib function, without its body."""
    source = module_source(module)
    node = _top_level_functions(module).get(name)
    if node is None or ast.get_docstring(node) is None:
        return None
    lines = source.splitlines()
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    end = node.body[0].end_lineno
    return "\n".join(lines[start - 1 : end]) + "\n"


def prompts() -> list[dict]:
    """At least 12 prompts: code completion, doc question answering and summarisation."""
    out: list[dict] = []
    for module, name in CODE_FUNCTIONS:
        head = _function_head(module, name)
        if head is None or len(head) > 2000:
            continue
        out.append(
            {
                "id": f"code-{module}-{name}",
                "category": "code",
                "prompt": f"# From the Python standard library module `{module}`.\n{head}",
                "max_new_tokens": 96,
            }
        )
    for topic, question in QA_QUESTIONS:
        text = topic_text(topic)
        if text is None:
            continue
        user = (
            f"Read this part of the Python reference documentation ('{topic}'):\n\n"
            f"{excerpt(text)}\n\n"
            f"Using only the text above, answer in one or two sentences: {question}"
        )
        out.append(
            {
                "id": f"qa-{topic}",
                "category": "qa",
                "messages": [{"role": "user", "content": user}],
                "max_new_tokens": 64,
            }
        )
    for topic in SUMMARY_TOPICS:
        text = topic_text(topic)
        if text is None:
            continue
        user = (
            "Summarise the following Python documentation for a programmer who is new "
            f"to the language, in at most three sentences.\n\n{excerpt(text)}"
        )
        out.append(
            {
                "id": f"summarize-{topic}",
                "category": "summarization",
                "messages": [{"role": "user", "content": user}],
                "max_new_tokens": 96,
            }
        )
    return out


def docname_docs() -> list[dict]:
    """Multiple choice: given a function's docstring summary, pick its name among 4 from its module."""
    docs = []
    for module in MC_MODULES:
        funcs = _top_level_functions(module)
        summaries = {}
        for name, node in sorted(funcs.items()):
            doc = ast.get_docstring(node)
            if name.startswith("_") or not doc:
                continue
            first = doc.strip().splitlines()[0].strip()
            if len(first) < 15 or name.lower() in first.lower():
                continue
            summaries[name] = first
        # a summary shared by two functions would make the answer ambiguous
        counts = {}
        for first in summaries.values():
            counts[first] = counts.get(first, 0) + 1
        names = sorted(n for n, first in summaries.items() if counts[first] == 1)
        pool = sorted(n for n in funcs if not n.startswith("_"))
        if len(pool) < 4:
            continue
        rng = random.Random(f"qspec-docname-{module}")
        for name in rng.sample(names, min(MC_PER_MODULE, len(names))):
            wrong = rng.sample([n for n in pool if n != name], 3)
            choices = sorted(wrong + [name])
            docs.append(
                {
                    "module": module,
                    "summary": summaries[name],
                    "choices": choices,
                    "label": choices.index(name),
                }
            )
    return docs


def _all_names(module: str) -> list[str]:
    for node in _tree(module).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            try:
                return [n for n in ast.literal_eval(node.value) if isinstance(n, str)]
            except ValueError:
                return []
    return []


def _word_starts(name: str) -> list[int]:
    """Where a new word begins in an identifier: at '_' or at a lower-to-upper change."""
    return [
        i
        for i in range(1, len(name))
        if (name[i] == "_" and name[i - 1] != "_") or (name[i].isupper() and name[i - 1].islower())
    ]


def import_docs() -> list[dict]:
    """Generative: finish a public name in `from module import <prefix>`; one right answer.

    The prefix ends at a word boundary (``Ordered|Dict``, ``get_close|_matches``) so a
    small model is not asked to continue half a token, and it is the shortest such
    prefix that no other public name of the module shares.
    """
    docs = []
    for module in IMPORT_MODULES:
        names = sorted(set(_all_names(module)))
        splits = {}
        for name in names:
            if name.startswith("_") or name.isupper():
                continue
            for cut in _word_starts(name):
                prefix = name[:cut]
                if len(name) - cut >= 3 and not any(
                    o != name and o.startswith(prefix) for o in names
                ):
                    splits[name] = cut
                    break
        rng = random.Random(f"qspec-import-{module}")
        picked = sorted(rng.sample(sorted(splits), min(IMPORT_PER_MODULE, len(splits))))
        for name in picked:
            cut = splits[name]
            docs.append(
                {
                    "module": module,
                    "text": f"# Python standard library\nfrom {module} import {name[:cut]}",
                    "target": name[cut:],
                }
            )
    return docs


MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "In the Python module {{{{module}}}}, which function is described as: {{{{summary}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: generated by qspec.suites.python_docs from the Python standard library
"""

GEN_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: text
doc_to_target: target
target_delimiter: ""
generation_kwargs:
  until: ["\\n", " ", ",", "("]
  do_sample: false
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: generated by qspec.suites.python_docs from the Python standard library
"""


def _jsonl(docs: list[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def tasks() -> list[Path]:
    """Write the two lm-eval YAML tasks and their data into the cache; return the YAML paths.

    The entry is named by a hash of its data, so Pythons of different versions sharing one
    cache never rewrite each other's files, and an existing entry is never changed under a
    running evaluation. It is written whole with atomic_dir; the YAMLs name their data by
    absolute path, so they are rewritten when the entry is missing or the cache has moved.
    """
    data = {MC_TASK: _jsonl(docname_docs()), GEN_TASK: _jsonl(import_docs())}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    out = cache.entry_dir("suites", f"default-{key}")
    files = {f"{name}.jsonl": text for name, text in data.items()}
    for name, template in ((MC_TASK, MC_YAML), (GEN_TASK, GEN_YAML)):
        data_file = json.dumps(str(out / f"{name}.jsonl"))
        files[f"{name}.yaml"] = template.format(task=name, data=data_file)
    if not all(_has(out / name, text) for name, text in files.items()):
        with cache.atomic_dir(out) as tmp:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
    cache.touch(out)
    return [out / f"{MC_TASK}.yaml", out / f"{GEN_TASK}.yaml"]


def _has(path: Path, text: str) -> bool:
    return path.is_file() and path.read_text(encoding="utf-8") == text

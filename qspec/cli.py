"""The `qspec` command: evaluate, report, suites, cache."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from qspec.config import ConfigError, load_config


def _evaluate(args) -> int:
    from qspec.backends.vllm_probe import Probes
    from qspec.suites.discovery import load_suite
    from qspec.suites.files import SuiteError

    if args.resume and args.out and args.out.resolve() != args.resume.resolve():
        print(
            f"qspec: --out {args.out} and --resume {args.resume} name two folders: a resumed "
            "run continues in its own folder (give --resume alone)",
            file=sys.stderr,
        )
        return 2
    probes = Probes()  # vLLM's import, probed in the background while the models build
    try:
        cfg = load_config(args.config)
        overrides = {}
        if args.max_prompts is not None:
            overrides["max_prompts"] = args.max_prompts
        if args.max_new_tokens is not None:
            overrides["max_new_tokens"] = args.max_new_tokens
        if args.suite:
            overrides["suites"] = args.suite
        if args.executor is not None:
            overrides["executor"] = args.executor
        if overrides:
            from qspec.config import parse_config

            cfg = parse_config({**cfg.model_dump(), **overrides}, "command line")
        extra = [Path(p) for p in args.suites_path]
        # validated before any model loads
        suites = [load_suite(name, extra) for name in cfg.suites]
        _check_hub(suites)
        _check_heads(cfg)
        _check_quant(cfg)
        _check_engines(cfg, probes)
    except (ConfigError, SuiteError) as err:
        print(f"qspec: {err}", file=sys.stderr)
        return 2
    out = Path(args.resume or args.out or Path("reports") / time.strftime("run-%Y%m%d-%H%M%S"))
    from qspec.runner import run_evaluation

    try:
        status = run_evaluation(
            cfg, out, suites, resume=bool(args.resume), quiet=args.quiet, vllm_probes=probes
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished cells are in {out}; continue with --resume {out}",
            file=sys.stderr,
        )
        try:
            _print_report(out, None)
        except Exception as err:  # noqa: BLE001 - the results are safe; the page is a bonus
            print(f"report not written: {err}", file=sys.stderr)
        return 130
    print(f"results: {out / 'results.jsonl'}")
    _print_report(out, None)
    return status


def _check_engines(cfg, probes) -> None:
    """A served engine that cannot run fails now, naming the key and the fix."""
    if "vllm" not in cfg.engines:
        return
    from qspec.backends.vllm_probe import preflight

    problem = preflight(cfg.vllm, probes)
    if problem:
        raise ConfigError(
            f'{problem}. To run without the served engine set engines = ["qspec"] in the config.'
        )


def _check_heads(cfg) -> None:
    """A user's EAGLE-3 checkpoint that does not fit the target fails now, naming the key."""
    from qspec.models.precisions import HEAD_USER, head_kind
    from qspec.plan import served

    users = [
        (key, name)
        for key, names in (
            ("draft.precisions", cfg.draft.precisions),
            ("vllm.drafts", served(cfg)[1]),
        )
        for name in names
        if head_kind(name) == "user"
    ]
    if not users:
        return
    from transformers import AutoConfig

    from qspec.models.heads import user_head_problems
    from qspec.models.refs import resolve

    try:
        target = AutoConfig.from_pretrained(resolve(cfg.target.ref).location)
    except Exception as err:  # noqa: BLE001 - the run reports an unloadable target itself
        logging.getLogger("qspec").debug("target config not read for the head check: %s", err)
        return
    for key, name in users:
        problems = user_head_problems(name.removeprefix(HEAD_USER), target)
        if problems:
            raise ConfigError(f"{key}: {name}: " + "; ".join(problems))


def _check_quant(cfg) -> None:
    """A compressed-tensors precision needs llm-compressor's own venv to build: its absence
    fails now, naming the fix (a checkpoint already in the cache needs no build, but the
    venv is asked for all the same: a fresh machine would need it)."""
    from qspec.models.precisions import COMPRESSED
    from qspec.plan import served

    served_targets, served_drafts = served(cfg)
    named = [
        *cfg.target.precisions,
        *cfg.quality.variants,
        *cfg.draft.precisions,
        *served_targets,
        *served_drafts,
    ]
    wanted = sorted({p.removeprefix("self:") for p in named} & set(COMPRESSED))
    if not wanted:
        return
    from qspec.models.compressed_build import quant_problem

    problem = quant_problem()
    if problem:
        raise ConfigError(f"precisions {', '.join(wanted)} are built by llm-compressor: {problem}")


def _check_hub(suites) -> None:
    """Suites that need the Hugging Face hub fail now, not after the models are built."""
    from qspec.suites.files import SuiteError

    needy = [s.name for s in suites if s.requires_hub]
    if not needy:
        return
    from qspec.lmeval.hub import hub_reachable

    ok, reason = hub_reachable()
    if not ok:
        raise SuiteError(
            f"suite {needy[0]!r} needs the Hugging Face hub (its tasks and data come from there), "
            f"which cannot be reached: {reason}. Use the offline 'default' suite or your own."
        )


def _print_report(run_dir: Path, budget) -> None:
    from qspec.report import summary_text, write_report

    page = write_report(run_dir, budget)
    print(f"report: {page}")
    print(summary_text(run_dir, budget))


def _report(args) -> int:
    from qspec.report import Budget

    if not (args.dir / "results.jsonl").exists():
        print(
            f"qspec: {args.dir / 'results.jsonl'} not found (expected a run directory)",
            file=sys.stderr,
        )
        return 2
    _print_report(args.dir, Budget(args.max_ppl_increase_pct, args.max_accuracy_drop_points))
    return 0


def _suites(args) -> int:
    from qspec.suites.discovery import list_suites
    from qspec.suites.files import SuiteError

    try:
        found = list_suites([Path(p) for p in args.suites_path])
    except SuiteError as err:
        print(f"qspec: {err}", file=sys.stderr)
        return 2
    broken = 0
    for s in found:
        if s.error:
            broken += 1
            print(f"{s.name:20s} {s.origin:28s} BROKEN: {s.error}")
            continue
        what = ", ".join(s.declares()) or "-"
        print(f"{s.name:20s} {s.origin:28s} {what:28s} {s.n_prompts:3d} prompts  {s.path}")
    return 2 if broken else 0


def _cache(args) -> int:
    from qspec import cache

    if args.action == "clear":
        gone = cache.clear(args.names or None)
        print(f"removed {len(gone)} entries ({sum(e.bytes for e in gone) / 1024**2:.1f} MiB)")
        return 0
    print(cache.describe_entries())
    return 0


def _quiet_libraries() -> None:
    """transformers' per-load progress bars and notices drown qspec's own progress."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and GPTQ's bars; qspec has its own
    # torchao (pulled in by gptqmodel) reports kernels this CPU build lacks and registers
    # enums the way torch now warns about, at every import; optimum and gptqmodel log each
    # quantized layer: none of it concerns a qspec run
    for name in ("torchao", "torch.utils._pytree", "optimum", "gptqmodel"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qspec", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every library's debug messages too"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="build variants, run every pairing, store results")
    ev.add_argument(
        "--config", type=Path, help="TOML config (default: the embedded offline config)"
    )
    ev.add_argument("--out", type=Path, help="output directory (default: reports/run-<time>)")
    ev.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR: skip finished cells (not with a different --out)",
    )
    ev.add_argument("--suite", action="append", help="suite name or folder (repeatable)")
    ev.add_argument("--suites-path", action="append", default=[], help="extra folder of suites")
    ev.add_argument(
        "--max-prompts", type=int, help="prompts per suite (overrides the config's max_prompts)"
    )
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        help="tokens generated per prompt (overrides the config's max_new_tokens)",
    )
    ev.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="run cells in this process (local, the default) or as Ray jobs ([ray] in the config)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bars (CI)")
    ev.set_defaults(func=_evaluate)
    rp = sub.add_parser("report", help="(re)write DIR/index.html from a run's results")
    rp.add_argument("dir", type=Path)
    rp.add_argument("--max-ppl-increase-pct", type=float, default=5.0)
    rp.add_argument("--max-accuracy-drop-points", type=float, default=2.0)
    rp.set_defaults(func=_report)
    ca = sub.add_parser(
        "cache",
        help="list or clear cache entries (models, gptq, suites, random-models, skip-search)",
    )
    ca.add_argument("action", choices=["list", "clear"])
    ca.add_argument("names", nargs="*", help="entries to clear (kind/name or name); default all")
    ca.set_defaults(func=_cache)
    su = sub.add_parser("suites", help="list every suite found and what it declares")
    su.add_argument("--suites-path", action="append", default=[])
    su.set_defaults(func=_suites)
    args = parser.parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:  # before a run started (a run's own handler says where it stopped)
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

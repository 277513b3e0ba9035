"""Draft heads for a run: an EAGLE-3 head trained by qspec on one target variant's own hidden
states (a build step, cached like a GPTQ build), or a user's EAGLE-3 / speculators checkpoint.

Drafter names (config [draft] precisions, models/precisions.py):
    eagle3            trained on the run's reference target variant: what users deploy beside
                      a quantized target
    eagle3-matched    trained on the cell's own target variant (its quantized states)
    eagle3:<path>     a checkpoint of the user's, local folder or hub id

Training text: the run's suite corpora, tokenized by the target, each document's last share
(heads.heldout_share) held out to judge the head. Every corpus token is used: two CPU minutes
buy about one epoch of SmolLM2-135M's default corpus (~9.4k tokens), so more text would not be
seen, and each token costs a teacher-forced target forward to collect.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qspec import cache
from qspec.engine.eagle_head import EagleHead
from qspec.models.eagle_checkpoint import head_problems, load_head, read_config, save_head
from qspec.models.eagle_training import train_head

# bump when training or the checkpoint changes what a cached head holds
HEAD_FORMAT = 1
REPORT = cache.SOURCE  # the training report, written last: the entry is finished


@dataclass
class TrainedHead:
    """A head ready to draft: its weights, the folder vLLM loads, and how it was made."""

    head: EagleHead
    folder: Path
    report: dict  # training figures (a trained head) or the checkpoint's provenance (a user's)
    cached: bool
    seconds: float


def split_corpus(tokenizer, texts: list[str], heldout_share: float, max_tokens: int | None):
    """(train, held-out) token sequences: each document's last share held out, so the head is
    judged on prose and code alike; at most max_tokens in all."""
    train, held, total = [], [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
        if len(ids) < 8:
            continue
        cut = int(len(ids) * (1 - heldout_share))
        train.append(ids[:cut])
        held.append(ids[cut:])
        total += len(ids)
    return train, held


def head_entry(location: str, precision: str, settings, seed: int, texts: list[str]) -> Path:
    """The cache folder of a head trained on this variant, text, settings and seed."""
    text = hashlib.sha256("\n\n".join(texts).encode()).hexdigest()
    blob = json.dumps(
        [HEAD_FORMAT, location, precision, settings.model_dump(), seed, text], sort_keys=True
    )
    return cache.entry_dir("heads", hashlib.sha256(blob.encode()).hexdigest()[:16])


def trained_head(
    target, location: str, precision: str, tokenizer, texts, settings, seed: int
) -> TrainedHead:
    """The head for this target variant: loaded from the cache, else trained (about
    settings.max_seconds of gradient steps after one teacher-forced pass) and cached."""
    start = time.perf_counter()
    out = head_entry(location, precision, settings, seed, texts)
    with cache.building(out) as missing:
        if not missing:
            cache.touch(out)
            report = json.loads((out / REPORT).read_text())
            head = load_head(out, target)
            return TrainedHead(head, out, report, True, time.perf_counter() - start)
        train, held = split_corpus(tokenizer, texts, settings.heldout_share, settings.max_tokens)
        if not train:
            raise ValueError("a head needs suite corpus text to train on (none was found)")
        with torch.enable_grad():
            head, report = train_head(
                target,
                train,
                held,
                seed=seed,
                max_seconds=settings.max_seconds,
                max_steps=settings.max_steps,
                draft_vocab_size=settings.draft_vocab_size,
                unroll=settings.unroll,
            )
        report.update(trained_on=precision, model=location, format=HEAD_FORMAT)
        report["seconds"] = time.perf_counter() - start
        verifier = {
            "name_or_path": location,
            "architectures": list(getattr(target.config, "architectures", None) or []),
            "num_hidden_layers": target.config.get_text_config(decoder=True).num_hidden_layers,
            "precision": precision,
        }
        with cache.atomic_dir(out) as tmp:
            save_head(head, tmp, verifier)
            (tmp / REPORT).write_text(json.dumps(report, indent=1))
    cache.touch(out)
    cache.enforce_limit(keep=out)
    return TrainedHead(head, out, report, False, time.perf_counter() - start)


def user_head(ref: str, target) -> TrainedHead:
    """A user's checkpoint: a local folder, or a hub id fetched by huggingface_hub."""
    start = time.perf_counter()
    folder = Path(ref).expanduser()
    if not folder.exists():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(ref))
    head = load_head(folder, target)
    config = read_config(folder)
    report = {
        "checkpoint": str(folder),
        "layout": "speculators" if "speculators_model_type" in config else "eagle3",
    }
    return TrainedHead(head, folder, report, True, time.perf_counter() - start)


def user_head_problems(ref: str, target_config) -> list[str]:
    """What does not fit between a user's checkpoint and the target, read from the two configs
    alone (before any weight loads); a hub id is checked when its weights are fetched."""
    folder = Path(ref).expanduser()
    if not (folder / "config.json").exists():
        return [] if not folder.exists() else [f"{folder}: no config.json (not a checkpoint)"]
    stand_in = _ConfigOnly(target_config)
    return head_problems(read_config(folder), stand_in)


class _ConfigOnly:
    """What head_problems reads of a target model, from its config alone."""

    def __init__(self, config):
        self.config = config
        self.name_or_path = getattr(config, "_name_or_path", "")

"""lm-eval models around qspec's in-memory models: HFLM without progress bars, and
SpeculativeLM, whose generation runs qspec's own speculative loop.

Greedy speculative decoding must not change a single generated string, so SpeculativeLM
with a drafter must score exactly what it scores without one (lossless.py checks it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from lm_eval.models.huggingface import HFLM

from qspec.engine.draft_length import DraftLength
from qspec.engine.loop import generate
from qspec.engine.sampling import GREEDY, Sampler, sampler_for
from qspec.suites.encoding import stop_ids

SEED = 1234
NOISY_LOGGERS = ("lm_eval", "lm-eval", "datasets", "evaluate")


def quiet_logging() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def silenced(name: str = "lm_eval") -> Iterator[None]:
    """Raise one logger to ERROR for a moment (HFLM warns on every in-memory model)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class QuietHFLM(HFLM):
    """HFLM without progress bars (lm-eval draws one per request type)."""

    def loglikelihood(self, requests, disable_tqdm: bool = True):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = True):
        return super().generate_until(requests, disable_tqdm=True)


def quiet_lm(model, tokenizer) -> QuietHFLM:
    """lm-eval's HFLM around an in-memory model, batch size 1, no progress bars."""
    quiet_logging()
    with silenced():
        return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


class SpeculativeLM(QuietHFLM):
    """HFLM whose generate_until runs qspec's speculative loop (batch size 1).

    drafter_factory() makes a fresh drafter per generation (drafters hold KV
    caches); None or gamma 0 is target-only decoding through the same loop.
    Greedy unless a task asks for do_sample with a positive temperature.
    `stats` accumulates steps, drafted and accepted tokens over all generations.
    """

    def __init__(
        self,
        pretrained,
        tokenizer,
        *,
        drafter_factory: Callable[[], object] | None = None,
        gamma: int = 0,
        seed: int = SEED,
        **kwargs,
    ) -> None:
        kwargs.setdefault("batch_size", 1)
        if kwargs["batch_size"] != 1:
            raise ValueError("SpeculativeLM decodes one sequence at a time: batch_size=1")
        quiet_logging()
        with silenced():
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        self.drafter_factory = drafter_factory
        self.gamma = gamma if drafter_factory is not None else 0
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._vocab_text: list[str] | None = None
        self._stop_ids: dict[tuple[str, ...], frozenset[int]] = {}
        self.stats = {
            "generations": 0,
            "tokens": 0,
            "steps": 0,
            "drafted": 0,
            "accepted": 0,
            "seconds": 0.0,
            "reruns": 0,
        }

    # Stop strings become token ids for the engine's eos_ids: a token whose own text
    # contains a stop string ends generation, as lm-eval's stopping criteria would.
    # A stop spanning two tokens ends it only at max_length; lm-eval cuts the text at
    # the first stop either way, so the returned string is the same.
    def _stops_as_ids(self, stops: tuple[str, ...]) -> frozenset[int]:
        if stops not in self._stop_ids:
            if self._vocab_text is None:
                ids = [[i] for i in range(len(self.tokenizer))]
                self._vocab_text = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            wanted = [s for s in stops if s]
            self._stop_ids[stops] = frozenset(
                i for i, text in enumerate(self._vocab_text) if any(s in text for s in wanted)
            )
        return self._stop_ids[stops]

    def _eos_ids(self) -> frozenset[int]:
        eot = self.eot_token_id
        return stop_ids(self.tokenizer, self.model) | ({eot} if isinstance(eot, int) else set())

    def _sampler(self, kwargs: dict) -> Sampler:
        temperature = kwargs.get("temperature") or 0.0
        if not kwargs.get("do_sample") or temperature <= 0.0:
            return GREEDY
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return sampler_for(
            "sample",
            temperature=float(temperature),
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
        )

    def _run(self, prompt, sampler, max_new_tokens, eos_ids):
        drafter = self.drafter_factory() if self.drafter_factory and self.gamma else None
        gen = generate(
            self.model,
            prompt,
            drafter=drafter,
            length=DraftLength(gamma=self.gamma),
            sampler=sampler,
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids,
            generator=self._generator if not sampler.greedy else None,
        )
        self.stats["steps"] += len(gen.steps)
        self.stats["drafted"] += sum(s.drafted for s in gen.steps)
        self.stats["accepted"] += sum(s.accepted for s in gen.steps)
        self.stats["seconds"] += gen.total_s
        return gen.tokens

    def _model_generate(self, context, max_length: int, stop: list[str], **kwargs):
        if context.shape[0] != 1:
            raise ValueError("SpeculativeLM needs batch_size=1")
        mask = kwargs.pop("attention_mask", None)
        prompt = context[0]
        if mask is not None:
            prompt = prompt[mask[0].bool().to(prompt.device)]  # drop any padding
        max_new = max(int(max_length) - context.shape[1], 0)
        sampler = self._sampler(kwargs)
        stops = tuple(stop or ())
        eos = self._eos_ids()
        stop_tokens = self._stops_as_ids(stops)
        tokens = self._run(prompt, sampler, max_new, eos | stop_tokens) if max_new else []
        last = tokens[-1] if tokens else None
        if last is not None and last in stop_tokens - eos and sampler.greedy:
            text = self.tok_decode(tokens)
            if not any(s and s in text for s in stops):
                # The token's own text held a stop string but not in context (a
                # tokenizer joining rule): decode without the early stop instead.
                self.stats["reruns"] += 1
                tokens = self._run(prompt, sampler, max_new, eos)
        self.stats["generations"] += 1
        self.stats["tokens"] += len(tokens)
        new = torch.tensor(tokens, dtype=context.dtype, device=context.device)
        return torch.cat([context[0], new]).unsqueeze(0)


def speculative_lm(
    model,
    tokenizer,
    *,
    drafter_factory: Callable[[], object] | None = None,
    gamma: int = 0,
    seed: int = SEED,
) -> SpeculativeLM:
    """A SpeculativeLM around an in-memory target (see SpeculativeLM)."""
    return SpeculativeLM(model, tokenizer, drafter_factory=drafter_factory, gamma=gamma, seed=seed)

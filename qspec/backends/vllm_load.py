"""Load on a served engine: streamed completions, at most `concurrency` in flight at a time.

httpx's async client rather than vLLM's own `vllm bench serve`: that client lives in vLLM's
venv (a process start and a ~7 s import per level) and sends text prompts, while these
requests send the very token ids qspec's own cells decode, so outputs compare token for
token with the target alone and with qspec's loop. The schedule is vLLM's
`--max-concurrency` with an unlimited request rate: every request is queued at once and a
semaphore lets `concurrency` of them run.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Request:
    slot: int  # position in the level's schedule (the pairing key across servers)
    prompt: int  # index into the prompts, round-robin
    tokens: list[int]  # the prompt's token ids
    max_tokens: int
    seed: int | None = None


@dataclass
class Result:
    """One streamed request: what came back and when (seconds since it was sent)."""

    slot: int
    prompt: int
    tokens: list[int] = field(default_factory=list)
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    chunk_tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    # vLLM's per-request acceptance (--per-request-spec-decode-metrics): drafted, accepted, steps
    spec: dict | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None and bool(self.tokens)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM bench's TPOT)."""
        if not self.ok or len(self.tokens) < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (len(self.tokens) - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between chunks: one gap per chunk, however many tokens it bundled."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:], strict=False)]


@dataclass
class Level:
    """One concurrency level's requests, as sent and answered."""

    concurrency: int
    results: list[Result]
    wall_s: float  # first send to last answer


def schedule(prompts: list[tuple[list[int], int]], concurrency: int, per_slot: int, seed) -> list:
    """A level's requests from (token ids, max tokens) prompts: every prompt at least once,
    round-robin, and `per_slot` requests per concurrent slot, so that the level is loaded for
    most of its duration. Sampled requests get seeds seed, seed+1, ... by slot."""
    n = max(len(prompts), concurrency * per_slot)
    return [
        Request(i, i % len(prompts), *prompts[i % len(prompts)], None if seed is None else seed + i)
        for i in range(n)
    ]


def body(model: str, req: Request, stop: list[int], sampling: dict | None) -> dict:
    out = {
        "model": model,
        "prompt": req.tokens,
        "max_tokens": req.max_tokens,
        "stop_token_ids": stop,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    if sampling is None:
        out["temperature"] = 0.0
    else:
        out.update(sampling)
        if req.seed is not None:
            out["seed"] = req.seed
    return out


async def _one(client, url, model, req, stop, sampling, gate) -> Result:
    res = Result(req.slot, req.prompt)
    async with gate:
        start = time.perf_counter()
        try:
            async with client.stream(
                "POST", f"{url}/v1/completions", json=body(model, req, stop, sampling)
            ) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    res.error = f"HTTP {resp.status_code}: {text}"
                    return res
                async for line in resp.aiter_lines():
                    _chunk(res, line, time.perf_counter() - start)
            res.e2e_s = time.perf_counter() - start
            if not res.tokens and res.error is None:
                res.error = "no tokens streamed"
        except httpx.HTTPError as err:
            res.error = f"{type(err).__name__}: {err}"
    return res


def _chunk(res: Result, line: str, at: float) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    data = json.loads(line[len("data: ") :])
    spec = (data.get("metrics") or {}).get("speculative_decoding")
    if spec:
        res.spec = spec
    for choice in data.get("choices") or []:
        new = choice.get("token_ids") or []
        if new:
            if res.ttft_s is None:
                res.ttft_s = at
            res.tokens.extend(new)
            res.chunk_s.append(at)
            res.chunk_tokens.append(len(new))
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]


async def _level(url, model, requests, concurrency, stop, sampling, headers, timeout_s):
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=30)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(_one(client, url, model, r, stop, sampling, gate) for r in requests)
        )
        return Level(concurrency, list(results), time.perf_counter() - start)


def run_level(
    url: str,
    model: str,
    requests: list[Request],
    concurrency: int,
    stop: list[int],
    sampling: dict | None = None,
    headers: dict | None = None,
    timeout_s: float = 600,
) -> Level:
    """Send every request, `concurrency` at a time; greedy when sampling is None."""
    return asyncio.run(
        _level(url, model, requests, concurrency, stop, sampling, headers, timeout_s)
    )

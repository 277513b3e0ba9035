"""An existing vLLM deployment ([vllm] url): what it serves and which vLLM it runs, asked of
its OpenAI-compatible API."""

from __future__ import annotations

import httpx


def deployment_pairing(url: str, headers: dict | None) -> dict:
    """What an existing server serves: its first model id from /v1/models."""
    resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return {"model": models[0]["id"]}


def deployment_version(url: str, headers: dict | None) -> str | None:
    """vLLM's /version of an existing server, e.g. "vllm 0.32.0" (None where it has none)."""
    try:
        resp = httpx.get(f"{url}/version", headers=headers, timeout=10)
        resp.raise_for_status()
        return f"vllm {resp.json()['version']}"
    except (httpx.HTTPError, ValueError, KeyError):
        return None

"""Is the Hugging Face hub reachable? lm-eval's registry tasks need it; local YAML tasks do not.
Light on purpose: the command line asks before any model loads."""

from __future__ import annotations

import os
import socket
import threading

HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason). Fails fast: offline env vars, else one TCP connect to the hub.

    The connect (DNS included) runs in a daemon thread so a hanging resolver cannot
    hold the caller longer than `timeout`.
    """
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False, f"{var}={os.environ[var]} is set (offline mode)"
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection(HUB_HOST, timeout=timeout):
                result.append(None)
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return False, f"no answer from {HUB_HOST[0]}:{HUB_HOST[1]} within {timeout:g} s"
    if result[0] is not None:
        return False, f"cannot reach {HUB_HOST[0]}:{HUB_HOST[1]} ({result[0]})"
    return True, ""

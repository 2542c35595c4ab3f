"""The Hugging Face hub as the model and data loaders see it: is a name a hub id, is the hub
switched off, can it be reached. One probe for both, so an offline machine fails in seconds
with the same words whether a model or a dataset asked."""

from __future__ import annotations

import os
import re
import socket
import threading
from urllib.parse import urlsplit

# Seconds allowed to resolve and reach the hub before declaring it unreachable; without this a
# hub id offline spends ~25 s in huggingface_hub's retries before failing.
HUB_PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
# "name" or "owner/name"; anything else (absolute, ./, ~/, deeper paths) is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(str(name)))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)


def hub_offline(datasets: bool = False) -> bool:
    """HF_HUB_OFFLINE (and, for datasets, HF_DATASETS_OFFLINE) set to a true value."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    Runs in a daemon thread because name resolution has no timeout of its own.
    """
    url = urlsplit(endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result["ok"]

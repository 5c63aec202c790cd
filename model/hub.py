"""Is the Hugging Face hub reachable? Asked once per process, answered in at most a few seconds.

huggingface_hub retries a failed request five times with back-off (~23 s when DNS fails), and every
component that fetches from the hub (config, weights, tokenizer) would wait again. So the first hub
access probes the endpoint with one short TCP connection; when it fails, every later lookup uses
the local cache only (`local_files_only=True`) and a missing file is reported at once. The probe is
skipped (the hub is assumed reachable) behind an HTTPS proxy, which only the HTTP client can use.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_SECONDS = 3.0


@functools.cache
def hub_unreachable() -> str | None:
    """None when the hub may be used, else why not (offline mode, or the connection failed)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as error:
        return f"{host}:{port} is unreachable ({error})"

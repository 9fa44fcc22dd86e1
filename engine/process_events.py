"""Machine-readable events of a worker process: one JSON object per line on stdout.

A worker prints nothing else on stdout (logs go to stderr), so whoever started it (``fairgate
generate --disaggregated``, ``fairgate up``, the tests) can wait for ``ready`` without polling::

    {"event": "ready", "role": "decode", "worker_id": ..., "http_url": ..., "kv_host": ..., ...}
    {"event": "failpoint", "name": "kv.send.mid_transfer"}

Torch-free.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

__all__ = ["emit_event"]

_lock = threading.Lock()


def emit_event(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, **fields}, separators=(",", ":"))
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

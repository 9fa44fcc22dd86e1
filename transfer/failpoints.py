"""Failpoints: named places in a worker where a test can make a real worker process misbehave.

``FAIRGATE_FAILPOINTS="kv.send.mid_transfer=pause,kv.recv.mid_transfer=error"`` (read when a
failpoint is first reached). ``pause`` announces the hit as a ``failpoint`` event on stdout and
blocks the thread for good, so a test can kill the process at a known point of a transfer;
``error`` raises ``TransferError``. Unset, a failpoint costs one dictionary lookup. Used by the
fault tests; never set in production.

Failpoints: ``kv.send.mid_transfer`` (after the first message of a transfer is sent),
``kv.recv.mid_transfer`` (after the first message is received), ``engine.forward`` (before each
runner step of the engine: ``error`` fails that step's requests, and three such steps in a row
kill the engine; ``pause`` wedges the engine thread), ``decode.reserved`` (on a decode worker,
after a reservation, before its ``Reserved`` frame goes out) and ``prefill.target_arrived`` (on
a prefill worker, when a request's KV target arrives, before it is used); both run on the event
loop, so ``pause`` wedges the whole worker.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

from engine.process_events import emit_event
from transfer.errors import TransferError

__all__ = ["failpoint"]

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "FAIRGATE_FAILPOINTS"
_ACTIONS = ("pause", "error")


@functools.cache
def _configured() -> dict[str, str]:
    actions: dict[str, str] = {}
    for item in os.environ.get(ENVIRONMENT_VARIABLE, "").split(","):
        if not item.strip():
            continue
        name, _, action = item.strip().partition("=")
        if action not in _ACTIONS:
            raise ValueError(f"{ENVIRONMENT_VARIABLE}: {item!r} is not NAME=pause or NAME=error")
        actions[name] = action
    return actions


def failpoint(name: str) -> None:
    action = _configured().get(name)
    if action is None:
        return
    logger.warning("failpoint %s: %s", name, action)
    emit_event("failpoint", name=name, action=action)
    if action == "error":
        raise TransferError(f"failpoint {name}")
    threading.Event().wait()  # pause: until the process is killed

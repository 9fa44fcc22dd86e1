"""The garbage collector and a long-running serving process. Torch-free."""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> None:
    """Take what startup built (a model's modules and weights' Python objects, a tokenizer's
    tables) out of the garbage collector's view, as serving engines do once loaded: it lives
    as long as the process, and every full collection would scan it again, a pause of 0.1-0.4 s
    (measured on 2 cores, tiny model) in the middle of serving. Garbage first, so only what is
    alive is frozen; reference counting still frees it."""
    gc.collect()
    gc.freeze()

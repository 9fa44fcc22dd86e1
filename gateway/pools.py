"""``ModelPools``: the models the workers serve, one pool per model, and who may join which.

A worker joins the pool of the model it announces (``WorkerInfo.model_id``); the first worker
of a model fixes the pool's reference: its KV layout (the very struct the KV handshake compares,
``KvLayoutInfo.differences``) and its tokenizer (``tokenizer_digest``). A later worker of that
model with another layout or tokenizer is incompatible, with the differing fields named: its KV
would not pair with the pool's, or its token ids would mean other text. Workers of another model
are not incompatible: they make their own pool, and the dispatcher pairs a prefill worker only
with a decode worker of its own pool (``WorkerRegistry.ready(role, model)``); the handshake's
refusal stays the last line of defence.

One KV block size holds for every pool: the prefix index keeps block hashes in one granularity
(``SchedulingPolicy.set_block_size``), so a worker with another block size is incompatible
whatever its model.

A pool stays once its model was seen, with its workers dead or gone: a request for a known model
with no live worker is a 503 (try again later), not a 404 (no such model). The registry owns the
handles; this owns only what each model was announced as. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from transfer.messages import WorkerInfo

__all__ = ["ModelPool", "ModelPools"]


@dataclass(frozen=True, slots=True)
class ModelPool:
    """One model as its first worker announced it."""

    model_id: str
    reference: WorkerInfo  # its KV layout and tokenizer are the pool's

    @property
    def tokenizer_digest(self) -> str:
        return self.reference.tokenizer_digest

    def differences(self, info: WorkerInfo) -> list[str]:
        """What keeps a worker of this model (``info``) out of the pool; empty: it may join."""
        problems: list[str] = []
        ours, theirs = self.reference.kv_layout, info.kv_layout
        if ours is not None and theirs is not None:
            problems += ours.differences(theirs, labels=("the pool", "this worker"))
        elif ours is not theirs:  # one announced no layout: an older worker beside a newer one
            problems.append("KV layout announced by only one of it and the pool")
        if info.tokenizer_digest != self.reference.tokenizer_digest:
            problems.append("another tokenizer than the pool's")
        return problems


class ModelPools:
    """Every model seen, by id, and the one KV block size of them all."""

    def __init__(self) -> None:
        self._pools: dict[str, ModelPool] = {}
        self.block_size: int | None = None  # the first worker's; None: no worker seen yet

    def admit(self, info: WorkerInfo) -> str | None:
        """Why the worker announcing ``info`` may not serve, else ``None`` (and its model's
        pool exists from now on)."""
        if self.block_size is not None and info.block_size != self.block_size:
            return (
                f"uses KV blocks of {info.block_size} tokens, the other workers "
                f"{self.block_size} (one block size for every model: the prefix index's)"
            )
        pool = self._pools.get(info.model_id)
        if pool is not None:
            problems = pool.differences(info)
            if problems:
                return f"serves {info.model_id!r} unlike its pool: " + "; ".join(problems)
            return None
        self.block_size = info.block_size
        self._pools[info.model_id] = ModelPool(info.model_id, info)
        return None

    def get(self, model_id: str) -> ModelPool | None:
        return self._pools.get(model_id)

    def model_ids(self) -> list[str]:
        """Every model seen, in the order first seen."""
        return list(self._pools)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._pools

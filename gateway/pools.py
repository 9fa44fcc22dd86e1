"""``ModelPools``: the models the workers serve, one pool per model, and who may join which.

A worker joins the pool of the model it announces (``WorkerInfo.model_id``); the first worker
of a model fixes the pool's tokenizer (``tokenizer_digest``), and the first prefill or decode
worker its KV layout (the very struct the KV handshake compares, ``KvLayoutInfo.differences``).
A later worker of that model with another tokenizer, or a prefill or decode worker with another
layout, is incompatible, with the differing fields named: its token ids would mean other text,
or its KV would not pair with the pool's. Colocated workers never exchange KV: a CPU one and a
GPU one may serve the same model side by side. Workers of another model
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


_PAIRED_ROLES = ("prefill", "decode")  # the roles whose KV moves between workers


@dataclass(slots=True)
class ModelPool:
    """One model as its workers announced it: its first worker (``reference``: tokenizer,
    context length) and its first prefill or decode worker (``kv_reference``: KV layout)."""

    model_id: str
    reference: WorkerInfo
    kv_reference: WorkerInfo | None = None

    @property
    def tokenizer_digest(self) -> str:
        return self.reference.tokenizer_digest

    def differences(self, info: WorkerInfo) -> list[str]:
        """What keeps a worker of this model (``info``) out of the pool; empty: it may join."""
        problems: list[str] = []
        if info.tokenizer_digest != self.reference.tokenizer_digest:
            problems.append("another tokenizer than the pool's")
        if info.role not in _PAIRED_ROLES or self.kv_reference is None:
            return problems
        ours, theirs = self.kv_reference.kv_layout, info.kv_layout
        if ours is not None and theirs is not None:
            problems += ours.differences(theirs, labels=("the pool", "this worker"))
        elif ours is not theirs:  # one announced no layout: an older worker beside a newer one
            problems.append("KV layout announced by only one of it and the pool")
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
        if pool is None:
            self.block_size = info.block_size
            pool = self._pools[info.model_id] = ModelPool(info.model_id, info)
        problems = pool.differences(info)
        if problems:
            return f"serves {info.model_id!r} unlike its pool: " + "; ".join(problems)
        if pool.kv_reference is None and info.role in _PAIRED_ROLES:
            pool.kv_reference = info
        return None

    def get(self, model_id: str) -> ModelPool | None:
        return self._pools.get(model_id)

    def model_ids(self) -> list[str]:
        """Every model seen, in the order first seen."""
        return list(self._pools)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._pools

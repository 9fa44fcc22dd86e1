"""What a token of each model costs, in tokens of the reference model: the cost factor that puts
service on different models in one unit (``gateway.policies.per_model``). Torch-free.

A model's factor is the admin's (``set_admin``) where one is set, else measured from its
workers' speeds, else 1.0. Measured: the seconds of worker time a token takes, prefill and
decode weighted as the policies weigh them (§1's ``w_in`` and ``w_out``):

    s_in(m)  = 1 / prefill_tok_s                    (median over the pool's prefill workers)
    s_out(m) = (decode_base_s + decode_token_s·B·L) / B
                   a decode step's time per sequence, at a reference batch of B = 16
                   sequences of L = 512 tokens (median over the decode workers)
    c(m)     = w_in·s_in(m) + w_out·s_out(m)
    f(m)     = c(m) / c(reference)

Measurements are smoothed (an exponential average, ``SMOOTHING`` per update) and clamped to
[``MIN_FACTOR``, ``MAX_FACTOR``]: a worker's first noisy figures should not swing what tenants are
charged. A request's factor is fixed when it is admitted, so its charges keep one meaning.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transfer.messages import WorkerLoad

__all__ = ["CostBook", "ModelCost", "ModelSpeed"]

REFERENCE_BATCH = 16
REFERENCE_CONTEXT = 512
SMOOTHING = 0.2
MIN_FACTOR = 0.01
MAX_FACTOR = 100.0


@dataclass(frozen=True, slots=True)
class ModelSpeed:
    """One worker's measured speeds (its ``WorkerLoad``): prefill tokens per second (0 or None:
    not measured, or not a prefill worker), and its decode step fit (None: not measured, or not
    a decode worker)."""

    prefill_tok_s: float | None = None
    decode_base_s: float | None = None
    decode_token_s: float = 0.0

    @classmethod
    def of(cls, load: WorkerLoad) -> ModelSpeed:
        """What a load report says (its figures are 0 until measured; the decode step fit is
        measured once either of its two is not 0: a fitted base may be 0 alone)."""
        is_fitted = load.decode_base_s > 0 or load.decode_token_s > 0
        return cls(
            prefill_tok_s=load.prefill_tok_s or None,
            decode_base_s=load.decode_base_s if is_fitted else None,
            decode_token_s=load.decode_token_s,
        )


@dataclass(frozen=True, slots=True)
class ModelCost:
    """A model's factor and where it comes from; ``seconds_per_token``: the measured c(m)."""

    model: str
    factor: float
    source: Literal["admin", "measured", "unmeasured"]
    seconds_per_token: float | None


class CostBook:
    """Cost factors by model (module docstring). ``reference``: the model whose token is the
    unit ("" : nothing is measured, every factor is the admin's or 1.0)."""

    def __init__(self, reference: str = "", *, w_in: float = 1.0, w_out: float = 2.0) -> None:
        self.reference = reference
        self.w_in = w_in
        self.w_out = w_out
        self._admin: dict[str, float] = {}
        self._seconds: dict[str, float] = {}  # smoothed c(m)

    def set_admin(self, model: str, factor: float | None) -> None:
        """The admin's factor for ``model`` (None: back to measured)."""
        if factor is None:
            self._admin.pop(model, None)
            return
        if not MIN_FACTOR <= factor <= MAX_FACTOR:
            raise ValueError(f"a cost factor must be within [{MIN_FACTOR:g}, {MAX_FACTOR:g}]")
        self._admin[model] = factor

    def admin_models(self) -> list[str]:
        """The models whose factor the admin set."""
        return list(self._admin)

    def measure(self, model: str, speeds: Sequence[ModelSpeed]) -> None:
        """The pool's workers' speeds now (a model whose speeds are not all known yet keeps
        what it had)."""
        seconds = self._seconds_per_token(speeds)
        if seconds is None:
            return
        before = self._seconds.get(model)
        self._seconds[model] = (
            seconds if before is None else before + SMOOTHING * (seconds - before)
        )

    def factor(self, model: str) -> float:
        return self.cost(model).factor

    def cost(self, model: str) -> ModelCost:
        seconds = self._seconds.get(model)
        admin = self._admin.get(model)
        if admin is not None:
            return ModelCost(model, admin, "admin", seconds)
        reference = self._seconds.get(self.reference) if self.reference else None
        if seconds is None or reference is None or reference <= 0:
            return ModelCost(model, 1.0, "unmeasured", seconds)
        factor = min(MAX_FACTOR, max(MIN_FACTOR, seconds / reference))
        return ModelCost(model, float(f"{factor:.2g}"), "measured", seconds)

    def _seconds_per_token(self, speeds: Sequence[ModelSpeed]) -> float | None:
        prefill = [s.prefill_tok_s for s in speeds if s.prefill_tok_s]
        decode = [
            (s.decode_base_s + s.decode_token_s * REFERENCE_BATCH * REFERENCE_CONTEXT)
            / REFERENCE_BATCH
            for s in speeds
            if s.decode_base_s is not None
        ]
        if not prefill or not decode:
            return None
        s_in = 1.0 / statistics.median(prefill)
        s_out = statistics.median(decode)
        return self.w_in * s_in + self.w_out * s_out

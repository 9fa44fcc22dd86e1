"""Cost factors (``gateway.model_costs``): measured from the pools' speeds against the reference
model, or the admin's, or 1.0."""

from __future__ import annotations

import pytest

from gateway.model_costs import CostBook, ModelSpeed
from transfer.messages import WorkerLoad


def _pool(prefill_tok_s: float, decode_base_s: float, decode_token_s: float) -> list[ModelSpeed]:
    """A prefill and a decode worker."""
    return [
        ModelSpeed(prefill_tok_s=prefill_tok_s),
        ModelSpeed(decode_base_s=decode_base_s, decode_token_s=decode_token_s),
    ]


def test_a_model_four_times_slower_costs_four_times_as_much() -> None:
    book = CostBook("small")
    book.measure("small", _pool(4000.0, 0.010, 1e-6))
    book.measure("large", _pool(1000.0, 0.040, 4e-6))
    assert book.cost("small").factor == 1.0
    large = book.cost("large")
    assert (large.factor, large.source) == (4.0, "measured")


def test_a_colocated_worker_gives_both_speeds() -> None:
    book = CostBook("a")
    book.measure("a", [ModelSpeed(2000.0, 0.02, 0.0)])
    book.measure("b", [ModelSpeed(1000.0, 0.04, 0.0)])
    assert book.factor("b") == 2.0


def test_unmeasured_models_and_a_missing_reference_cost_one() -> None:
    book = CostBook("ref")
    book.measure("b", _pool(1000.0, 0.04, 0.0))  # the reference has no figures yet
    assert book.cost("b").source == "unmeasured" and book.factor("b") == 1.0
    book.measure("c", [ModelSpeed(prefill_tok_s=1000.0)])  # no decode fit yet
    assert book.cost("c").seconds_per_token is None
    assert CostBook("").factor("anything") == 1.0


def test_the_admins_factor_wins_until_it_is_cleared() -> None:
    book = CostBook("small")
    book.measure("small", _pool(4000.0, 0.01, 0.0))
    book.measure("large", _pool(1000.0, 0.04, 0.0))
    book.set_admin("large", 10.0)
    assert book.cost("large").source == "admin" and book.factor("large") == 10.0
    book.set_admin("large", None)
    assert book.factor("large") == 4.0
    with pytest.raises(ValueError, match="within"):
        book.set_admin("large", 0.0)


def test_a_new_measurement_moves_the_factor_by_a_fifth() -> None:
    book = CostBook("small")
    book.measure("small", _pool(1000.0, 0.01, 0.0))
    book.measure("large", _pool(1000.0, 0.01, 0.0))
    assert book.factor("large") == 1.0
    book.measure("large", _pool(1000.0 / 6, 0.06, 0.0))  # six times slower now
    assert book.factor("large") == pytest.approx(2.0)  # 1 + 0.2 · (6 − 1)


def test_a_load_report_whose_step_fit_has_no_base_is_measured() -> None:
    """The decode step fit often has a base of 0 (clamped, or before the contexts spread): it is
    a measurement all the same, not "unmeasured" (every factor was 1.0 before)."""
    small = [
        ModelSpeed.of(WorkerLoad("p", "prefill", True, prefill_tok_s=4000.0)),
        ModelSpeed.of(WorkerLoad("d", "decode", True, decode_token_s=4e-6)),
    ]
    large = [
        ModelSpeed.of(WorkerLoad("p", "prefill", True, prefill_tok_s=1000.0)),
        ModelSpeed.of(WorkerLoad("d", "decode", True, decode_token_s=1.6e-5)),
    ]
    book = CostBook("small")
    book.measure("small", small)
    book.measure("large", large)
    assert (book.cost("large").factor, book.cost("large").source) == (4.0, "measured")
    unmeasured = ModelSpeed.of(WorkerLoad("d", "decode", True))
    assert unmeasured.decode_base_s is None and unmeasured.prefill_tok_s is None

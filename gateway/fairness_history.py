"""Who was served what, while backlogged, over the last hour: the per-tenant samples behind the
dashboard's fairness charts (``series``) and the fairness receipts (``receipt``,
``GET /admin/v1/tenants/{tenant}/fairness``).

Sampled about once a second (``Gateway._sample_forever``) from ``GatewayMetrics``'s view of the
tenants (``TenantPoint``: weight, cumulative service, requests queued). Each sample closes an
*interval* since the one before and keeps, per tenant that was backlogged or served in it, one
row of a NumPy record array: what it received, how long it was backlogged, what it was entitled
to (see below). A sample less than ``min_interval_s`` after the last is skipped (what it would
have held goes into the next), so frequent callers (a scrape a second) neither crowd the
history nor shrink its window.

Memory is bounded: intervals younger than ``fine_s`` (5 minutes) are kept as sampled (about a
second each); older ones are merged into ``coarse_s`` (10 s) buckets, whose rows hold the sums
of their intervals' rows. An hour of 1000 active tenants is then about 640 rows each, ~49 B a
row: ~31 MiB (200 tenants: ~6 MiB; a dict per tenant-sample took ~200 B, 684 MiB). The shares
and totals are sums, exact after merging; the service gap is measured at the kept samples'
times only, so over the merged part it is seen at 10 s resolution (it can only be understated
there, by what changes within 10 s; the receipt says so in its ``note``).

Two measures of service, from ``GatewayMetrics.served``: the active policy's charge
(``scheduling.md``: VTC charges ``w_in`` × the full prompt, DLPM, D²LPM and the others the
prompt tokens computed, a prefix-cache hit being free; plus ``w_out`` × output tokens), times
the model's cost factor:

- **service units**: divided by the weight the request ran at (``fairgate_tenant_service_units_
  total``). Fair weighted service gives backlogged tenants equal service units; the policies'
  bounds on the gap between two tenants are in these units, of this charge.
- **cost units**: not divided; what a tenant's *share* of the work is measured in, against its
  entitled share ``weight / Σ weights`` of the backlogged tenants.

An interval counts as backlogged for a tenant when it had requests queued at both of its
samples (the policies' guarantees are for tenants continuously backlogged; a merged one, when
every interval in it did). Over a window, for a tenant ``u``, with ``B_k`` the tenants
backlogged over interval ``k`` and ``I_u`` the intervals where ``u`` was::

    entitled share = Σ_{k∈I_u} len_k · w_u / Σ_{v∈B_k} w_v   /  Σ_{k∈I_u} len_k
    received share = Σ_{k∈I_u} cost_u(k)  /  Σ_{k∈I_u} Σ_{v∈B_k} cost_v(k)

and the service gap to another tenant ``v`` is, over each run of consecutive intervals where
both were backlogged, the largest change of ``S_u − S_v`` (service units) between two samples
of the run: the largest gap over any interval in which both were backlogged, which is what
the policies bound. A receipt computes it for every other tenant at once, vectorised over the
window's intervals × tenants (about 20 ms for 200 tenants over an hour, 90 ms for 1000, on
one core of the shared test machine), so it runs on the event loop. Torch-free.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_HORIZON_S",
    "FairnessHistory",
    "FairnessReceipt",
    "GapBound",
    "GapReport",
    "SeriesPoint",
    "TenantPoint",
    "TenantSeries",
    "WindowShares",
]

DEFAULT_HORIZON_S = 3600.0
MIN_SAMPLE_INTERVAL_S = 0.5  # closer samples are skipped (module docstring)
FINE_S = 300.0  # intervals kept as sampled (the receipts' default window)
COARSE_S = 10.0  # older ones: merged into buckets this long
_THROUGHOUT = 1  # a row's flag: the tenant was backlogged over the whole interval

# One tenant in one interval. ``tenant``: its index in ``FairnessHistory._ids``; ``service`` /
# ``cost``: what it received; ``own_cost`` / ``pool_cost``: the cost it received, and that all
# the backlogged tenants received, over the part it was backlogged in (the received share's
# sums); ``backlogged_s`` / ``entitled_s``: seconds it was backlogged, and those times its
# entitled share (the entitled share's sums); ``weight``: its latest.
_ROW = np.dtype(
    [
        ("tenant", np.int32),
        ("service", np.float64),
        ("cost", np.float64),
        ("own_cost", np.float64),
        ("pool_cost", np.float64),
        ("backlogged_s", np.float32),
        ("entitled_s", np.float32),
        ("weight", np.float32),
        ("flags", np.uint8),
    ]
)

_Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class TenantPoint:
    """A tenant now, as ``GatewayMetrics.fairness_points`` reads it: its weight, the service it
    has received so far (cumulative, both measures), and its requests waiting for workers."""

    tenant_id: str
    name: str
    weight: float
    service_units: float
    cost_units: float
    num_queued: int


@dataclass(frozen=True, slots=True)
class _Interval:
    """From one kept sample to the next: monotonic seconds ``t0``-``t`` (lengths), epoch
    seconds ``at0``-``at`` (what the answers show), and a row per tenant active in it."""

    t0: float
    t: float
    at0: float
    at: float
    rows: np.ndarray

    @property
    def length(self) -> float:
        return self.t - self.t0


class SeriesPoint(msgspec.Struct, frozen=True):
    """One point of a tenant's chart, over the interval that ends at ``t`` (epoch seconds):
    its service rate (service units per second), and, where it was backlogged in the
    interval, its entitled and received shares (None where it was not)."""

    t: float
    service_rate: float
    entitled_share: float | None
    received_share: float | None


class TenantSeries(msgspec.Struct, frozen=True):
    tenant_id: str
    tenant: str  # its name
    weight: float  # its latest
    points: list[SeriesPoint]


class GapReport(msgspec.Struct, frozen=True):
    """The largest service gap to another tenant: its size (service units) over
    [``start``, ``end``] (epoch seconds), a stretch in which both tenants were backlogged;
    ``is_ahead``: the receipt's tenant received more in it; ``bound``: the policy's bound for
    these two tenants (None: the policy has none); ``within_bound``: the gap is within it."""

    tenant_id: str
    tenant: str
    units: float
    start: float
    end: float
    is_ahead: bool
    bound: float | None
    within_bound: bool | None


class FairnessReceipt(msgspec.Struct, frozen=True):
    """What a tenant received over a window (module docstring for the definitions).

    ``start``/``end`` (epoch seconds) and ``seconds``: the window the samples cover, less than
    ``window_s`` when the gateway has not been up that long. ``service_units`` / ``cost_units``:
    what the tenant received in it, of the policy's charge (``measure`` says which);
    ``weight``: its weight at the last sample; ``backlogged_s``: how long it was backlogged;
    ``entitled_share`` / ``received_share``: over the intervals it was backlogged (None: it
    never was). ``max_gap``: the largest service gap to another tenant backlogged at the same
    time (None: none was). ``policy``, ``bound`` (service units, for the pair of ``max_gap``;
    None: the policy has none, or no gap) and ``bound_formula``: the policy's guarantee
    (``scheduling.md``) and the values it was computed from. ``within_bound``: every other
    tenant's gap is within its bound (None: no bound to check). ``resolution_s``: the longest
    interval between two of the window's samples (the gap is seen at the samples only).
    ``note``: what the figures need said."""

    tenant_id: str
    tenant: str
    window_s: float
    start: float
    end: float
    seconds: float
    num_samples: int
    service_units: float
    cost_units: float
    weight: float
    backlogged_s: float
    entitled_share: float | None
    received_share: float | None
    max_gap: GapReport | None
    policy: str
    bound: float | None
    bound_formula: str
    within_bound: bool | None
    note: str
    measure: str = ""
    resolution_s: float = 0.0


@dataclass(frozen=True, slots=True)
class GapBound:
    """A policy's bound on the service gap between two backlogged tenants (``scheduling.md``):
    VTC ``2U``, DLPM ``2(U + Q_u)``, D²LPM ``2·|W|·(U + Q_u)``, with ``U = w_in·L_input +
    w_out·M`` in cost units. In service units a request's charge is divided by its tenant's
    weight, so ``U`` becomes ``U / min(w_f, w_g)``; the deficits' quantum ``Q_u`` is charged in
    service units already. ``u_cost_units`` None: the policy has no bound (FCFS, RR-LPM), or
    its inputs are not known (no worker has said its context length or KV size).
    ``measure``: what the service it bounds counts (``GatewayMetrics.measure``)."""

    policy: str
    u_cost_units: float | None
    quantum: float = 0.0
    num_workers: int = 1
    formula: str = ""  # the bound with the values it uses, for people
    measure: str = ""

    def between(self, weight_f: float, weight_g: float) -> float | None:
        if self.u_cost_units is None:
            return None
        return float(self._of(np.array([min(weight_f, weight_g)]))[0])

    def _of(self, min_weights: _Floats) -> _Floats:
        """The bound for pairs whose smaller weight is each of ``min_weights`` (with
        ``u_cost_units`` known; NaN for a policy with none)."""
        assert self.u_cost_units is not None
        u = self.u_cost_units / min_weights
        if self.policy == "vtc":
            return 2 * u
        if self.policy == "dlpm":
            return 2 * (u + self.quantum)
        if self.policy == "d2lpm":
            return 2 * self.num_workers * (u + self.quantum)
        return np.full_like(u, math.nan)


@dataclass(frozen=True, slots=True)
class WindowShares:
    """A tenant's shares over a window (module docstring), of the intervals it was backlogged
    in."""

    entitled: float
    received: float | None  # None: no backlogged tenant was served in them


@dataclass(frozen=True, slots=True)
class _Sums:
    """Per tenant (by its column in ``tenants``), the window's sums of each row field."""

    tenants: list[int]  # history indices, sorted by tenant id
    service: _Floats
    cost: _Floats
    own_cost: _Floats
    pool_cost: _Floats
    backlogged_s: _Floats
    entitled_s: _Floats

    def entitled_share(self, column: int) -> float | None:
        seconds = float(self.backlogged_s[column])
        return float(self.entitled_s[column]) / seconds if seconds > 0.0 else None

    def received_share(self, column: int) -> float | None:
        if self.backlogged_s[column] <= 0.0 or self.pool_cost[column] <= 0.0:
            return None
        return float(self.own_cost[column] / self.pool_cost[column])


class FairnessHistory:
    """Per-tenant samples over ``horizon_s`` (module docstring). Called on the event loop."""

    def __init__(
        self,
        *,
        horizon_s: float = DEFAULT_HORIZON_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        min_interval_s: float = MIN_SAMPLE_INTERVAL_S,
        fine_s: float = FINE_S,
        coarse_s: float = COARSE_S,
    ) -> None:
        self.horizon_s = horizon_s
        self.min_interval_s = min_interval_s
        self.fine_s = fine_s
        self.coarse_s = coarse_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._fine: deque[_Interval] = deque()  # as sampled, oldest first
        self._coarse: deque[_Interval] = deque()  # merged; all older than ``_fine``'s
        # The last kept sample: (monotonic s, epoch s), and per tenant id its cumulative
        # service (both measures) and whether it had requests queued.
        self._last_at: tuple[float, float] | None = None
        self._last: dict[str, tuple[float, float, bool]] = {}
        self._names: dict[str, str] = {}  # tenant id → name, weight: the last sample's
        self._weights: dict[str, float] = {}
        self._index: dict[str, int] = {}  # tenant id → its index in the rows
        self._ids: list[str] = []

    # ---- sampling ---------------------------------------------------------------------------

    def sample(self, points: Iterable[TenantPoint]) -> None:
        now = self._clock()
        if self._last_at is not None and now - self._last_at[0] < self.min_interval_s:
            return  # too soon: the next sample takes this one's service too
        at = self._wall_clock()
        last: dict[str, tuple[float, float, bool]] = {}
        names: dict[str, str] = {}
        weights: dict[str, float] = {}
        active: list[tuple[int, float, float, float, bool]] = []  # index, service, cost, w, B
        for point in points:
            names[point.tenant_id] = point.name
            weights[point.tenant_id] = point.weight
            is_queued = point.num_queued > 0
            before = self._last.get(point.tenant_id, (point.service_units, point.cost_units, False))
            service = point.service_units - before[0]
            cost = point.cost_units - before[1]
            last[point.tenant_id] = (point.service_units, point.cost_units, is_queued)
            if is_queued or service or cost:
                # Backlogged over the interval: queued at both of its samples.
                active.append(
                    (
                        self._index_of(point.tenant_id),
                        service,
                        cost,
                        point.weight,
                        is_queued and before[2],
                    )
                )
        # Tenants the metrics forgot are dropped (one that is back starts from its total).
        self._last, self._names, self._weights = last, names, weights
        if self._last_at is not None:
            t0, at0 = self._last_at
            self._fine.append(_Interval(t0, now, at0, at, _rows_of(active, now - t0)))
        self._last_at = (now, at)
        self._prune(now)

    def _index_of(self, tenant_id: str) -> int:
        index = self._index.get(tenant_id)
        if index is None:
            index = self._index[tenant_id] = len(self._ids)
            self._ids.append(tenant_id)
        return index

    def _prune(self, now: float) -> None:
        """Drop what is past the horizon; merge what is past ``fine_s`` into buckets."""
        since = now - self.horizon_s
        for intervals in (self._coarse, self._fine):
            while intervals and intervals[0].t0 < since:
                intervals.popleft()
        fine = self._fine
        # A bucket once all of it is past ``fine_s`` (an interval longer than a bucket: alone).
        while fine and fine[0].t0 + self.coarse_s <= now - self.fine_s:
            bucket = [fine.popleft()]
            while fine and fine[0].t <= bucket[0].t0 + self.coarse_s:
                bucket.append(fine.popleft())
            self._coarse.append(_merged(bucket))

    # ---- reading ----------------------------------------------------------------------------

    def _window(self, window_s: float) -> list[_Interval]:
        """The intervals that lie within the last ``window_s`` (at most ``horizon_s``)."""
        if self._last_at is None:
            return []
        since = self._last_at[0] - min(window_s, self.horizon_s)
        window: list[_Interval] = []
        for intervals in (self._fine, self._coarse):  # newest first
            for interval in reversed(intervals):
                if interval.t0 < since:
                    return window[::-1]
                window.append(interval)
        return window[::-1]

    def _sums(self, rows: np.ndarray) -> _Sums:
        """Of a window's rows (``_concat``)."""
        tenants = self._by_id(rows["tenant"])
        column = np.zeros(len(self._ids), dtype=np.int64)
        column[tenants] = np.arange(len(tenants))
        columns = column[rows["tenant"]]

        def total(field: str) -> _Floats:
            return np.bincount(columns, rows[field], len(tenants)).astype(np.float64)

        return _Sums(
            tenants,
            total("service"),
            total("cost"),
            total("own_cost"),
            total("pool_cost"),
            total("backlogged_s"),
            total("entitled_s"),
        )

    # ---- the dashboard ----------------------------------------------------------------------

    def series(self, window_s: float, *, max_points: int = 300) -> list[TenantSeries]:
        """Per tenant active in the window (backlogged or served), its chart: the window's
        intervals in at most ``max_points`` runs of consecutive ones, each a ``SeriesPoint``."""
        window = self._window(window_s)
        if not window:
            return []
        per_point = math.ceil(len(window) / max(1, max_points))
        starts = list(range(0, len(window), per_point))
        num_groups = len(starts)
        rows = _concat(window)
        group_of = np.repeat(np.arange(len(window)) // per_point, [len(i.rows) for i in window])
        tenants = self._by_id(rows["tenant"])
        num_columns = len(tenants)
        column_of = np.zeros(len(self._ids), dtype=np.int64)
        column_of[tenants] = np.arange(num_columns)
        cells = group_of * num_columns + column_of[rows["tenant"]]
        size = num_groups * num_columns

        def total(field: str) -> list[list[float]]:
            sums = np.bincount(cells, rows[field], size).astype(np.float64)
            table: list[list[float]] = sums.reshape(num_groups, num_columns).tolist()
            return table

        service, own, pool = total("service"), total("own_cost"), total("pool_cost")
        backlogged, entitled = total("backlogged_s"), total("entitled_s")
        points: list[list[SeriesPoint]] = [[] for _ in tenants]
        for group, first in enumerate(starts):
            last = window[min(first + per_point, len(window)) - 1]
            seconds = last.t - window[first].t0
            for column in range(num_columns):
                rate = service[group][column] / seconds if seconds > 0.0 else 0.0
                seconds_backlogged = backlogged[group][column]
                if seconds_backlogged <= 0.0:
                    points[column].append(SeriesPoint(last.at, rate, None, None))
                    continue
                served = pool[group][column]
                points[column].append(
                    SeriesPoint(
                        last.at,
                        rate,
                        entitled[group][column] / seconds_backlogged,
                        own[group][column] / served if served > 0.0 else None,
                    )
                )
        return [
            TenantSeries(
                self._ids[t], self.name_of(self._ids[t]), self._weight_of(self._ids[t]), pts
            )
            for t, pts in zip(tenants, points, strict=True)
        ]

    def shares(self, window_s: float) -> dict[str, WindowShares]:
        """By tenant backlogged in the window, its entitled and received shares (module
        docstring)."""
        window = self._window(window_s)
        if not window:
            return {}
        sums = self._sums(_concat(window))
        return {
            self._ids[tenant]: WindowShares(entitled, sums.received_share(column))
            for column, tenant in enumerate(sums.tenants)
            if (entitled := sums.entitled_share(column)) is not None
        }

    def received_shares(self, window_s: float) -> dict[str, float]:
        """By tenant backlogged in the window, its received share (module docstring)."""
        return {
            tenant_id: shares.received
            for tenant_id, shares in self.shares(window_s).items()
            if shares.received is not None
        }

    # ---- receipts ---------------------------------------------------------------------------

    def receipt(self, tenant_id: str, window_s: float, bound: GapBound) -> FairnessReceipt:
        """The tenant's receipt over the last ``window_s`` (at most ``horizon_s``)."""
        window = self._window(window_s)
        rows = _concat(window)  # (once: it is most of the cost)
        sums = self._sums(rows)
        index = self._index.get(tenant_id)
        column = sums.tenants.index(index) if index in sums.tenants else None

        def own(values: _Floats) -> float:
            return 0.0 if column is None else float(values[column])

        gaps = self._gaps(window, rows, tenant_id, bound)
        largest = max(gaps, key=lambda g: g.units, default=None)
        within: bool | None = None
        if bound.u_cost_units is not None:
            within = all(g.within_bound is True for g in gaps)
        notes: list[str] = []
        if bound.u_cost_units is None:
            notes.append(bound.formula)
        if not window:
            notes.append("fewer than two samples in the window: nothing to measure yet")
        elif own(sums.backlogged_s) == 0.0:
            notes.append("the tenant was not backlogged in the window: no shares, no gap")
        elif largest is None:
            notes.append("no other tenant was backlogged at the same time: no gap")
        if within is False:
            over = [g.tenant for g in gaps if g.within_bound is False]
            notes.append("over the bound with: " + ", ".join(over))
        resolution = max((i.length for i in window), default=0.0)
        if window and self._coarse and window[0].t0 <= self._coarse[-1].t0:
            notes.append(
                f"samples older than {self.fine_s:g} s are merged {self.coarse_s:g} s apart: "
                "there the gap is seen at those samples only"
            )
        if window:
            start, end = window[0].at0, window[-1].at
        else:
            start = end = self._wall_clock() if self._last_at is None else self._last_at[1]
        return FairnessReceipt(
            tenant_id=tenant_id,
            tenant=self.name_of(tenant_id),
            window_s=window_s,
            start=start,
            end=end,
            seconds=window[-1].t - window[0].t0 if window else 0.0,
            num_samples=len(window) + 1 if window else int(self._last_at is not None),
            service_units=own(sums.service),
            cost_units=own(sums.cost),
            weight=self._weight_of(tenant_id),
            backlogged_s=own(sums.backlogged_s),
            entitled_share=None if column is None else sums.entitled_share(column),
            received_share=None if column is None else sums.received_share(column),
            max_gap=largest,
            policy=bound.policy,
            bound=None if largest is None else largest.bound,
            bound_formula=bound.formula,
            within_bound=within,
            note="; ".join(notes),
            measure=bound.measure,
            resolution_s=resolution,
        )

    def _gaps(
        self, window: Sequence[_Interval], rows: np.ndarray, f: str, bound: GapBound
    ) -> list[GapReport]:
        """Per other tenant backlogged at the same time as ``f`` in the window (by id), the
        largest change of ``S_f − S_g`` within a run of intervals where both were backlogged
        (module docstring), with the bound for the smallest weight either had in that run;
        ``within_bound`` is every run's verdict. All tenants at once: O(intervals × tenants).

        With F intervals, the F + 1 samples around them are the points; ``v[i, g]`` is the
        sum of ``S_f − S_g`` over the intervals before point ``i`` where both were backlogged.
        A run from interval ``k0`` to ``k1`` covers points ``k0`` … ``k1 + 1``, and ``v`` stays
        put after it until the next run's start: so the segment from one run's first point to
        the next's has the run's max and min (``reduceat`` over the columns laid end to end)."""
        index = self._index.get(f)
        if index is None or not window:
            return []
        row_of = np.repeat(np.arange(len(window)), [len(i.rows) for i in window])
        is_f = rows["tenant"] == index
        throughout = (rows["flags"] & _THROUGHOUT) != 0
        f_rows = np.flatnonzero(is_f & throughout)
        if not len(f_rows):
            return []
        num_intervals = len(window)
        f_service = np.zeros(num_intervals)
        f_weight = np.full(num_intervals, np.inf)
        f_service[row_of[f_rows]] = rows["service"][f_rows]
        f_weight[row_of[f_rows]] = rows["weight"][f_rows]
        # The others' rows in intervals where f was backlogged throughout, and they too.
        keep = ~is_f & throughout & np.isfinite(f_weight[row_of])
        if not keep.any():
            return []
        others = rows[keep]
        intervals = row_of[keep]
        tenants = self._by_id(others["tenant"])
        column_of = np.zeros(len(self._ids), dtype=np.int64)
        column_of[tenants] = np.arange(len(tenants))
        columns = column_of[others["tenant"]]
        num_columns, num_points = len(tenants), num_intervals + 1
        both = np.zeros((num_columns, num_intervals), dtype=bool)
        diff = np.zeros((num_columns, num_intervals))
        min_weight = np.full((num_columns, num_points), np.inf)
        both[columns, intervals] = True
        diff[columns, intervals] = f_service[intervals] - others["service"]
        # The weight of an interval goes on the point that ends it (a run's first point: none).
        min_weight[columns, intervals + 1] = np.minimum(
            f_weight[intervals], others["weight"].astype(np.float64)
        )
        values = np.zeros((num_columns, num_points))
        np.cumsum(diff, axis=1, out=values[:, 1:])
        # A run starts at interval k (point k) where both were backlogged and not in k − 1.
        starts = np.zeros((num_columns, num_points), dtype=bool)
        starts[:, :num_intervals] = both
        starts[:, 1:num_intervals] &= ~both[:, :-1]
        flat_starts = starts.ravel()
        boundaries = np.flatnonzero(flat_starts | (np.arange(starts.size) % num_points == 0))
        flat = values.ravel()
        highs = np.maximum.reduceat(flat, boundaries)
        lows = np.minimum.reduceat(flat, boundaries)
        weights = np.minimum.reduceat(min_weight.ravel(), boundaries)
        is_run = flat_starts[boundaries]  # (a column's points before its first run: not one)
        segment_column = boundaries // num_points
        units = np.where(is_run, highs - lows, -np.inf)
        limits = (
            bound._of(weights) if bound.u_cost_units is not None else np.full(len(units), np.nan)
        )
        over = is_run & ~(units <= limits)
        # Per column: its largest run (the first of equals), and whether any run is over.
        order = np.lexsort((-units, segment_column))  # by column, then largest first
        firsts = order[np.r_[True, segment_column[order][1:] != segment_column[order][:-1]]]
        any_over = np.bincount(segment_column, weights=over, minlength=num_columns) > 0
        reports: list[GapReport] = []
        for segment in firsts:
            if not is_run[segment]:
                continue  # never both backlogged (cannot happen: kept rows are)
            column = int(segment_column[segment])
            begin = int(boundaries[segment])
            stop = boundaries[segment + 1] if segment + 1 < len(boundaries) else flat.size
            run = flat[begin : int(stop)]
            low, high = int(np.argmin(run)), int(np.argmax(run))
            first, last = sorted((low, high))
            point = begin - column * num_points
            limit = None if bound.u_cost_units is None else float(limits[segment])
            tenant_id = self._ids[tenants[column]]
            reports.append(
                GapReport(
                    tenant_id=tenant_id,
                    tenant=self.name_of(tenant_id),
                    units=float(units[segment]),
                    start=_point_at(window, point + first),
                    end=_point_at(window, point + last),
                    is_ahead=high > low,
                    bound=limit,
                    within_bound=None if limit is None else not bool(any_over[column]),
                )
            )
        return reports

    def _by_id(self, indices: np.ndarray) -> list[int]:
        """The tenants of these row indices, once each, in the order of their ids."""
        return sorted(np.unique(indices).tolist(), key=self._ids.__getitem__)

    def name_of(self, tenant_id: str) -> str:
        return self._names.get(tenant_id, tenant_id)

    def _weight_of(self, tenant_id: str) -> float:
        return self._weights.get(tenant_id, 1.0)

    @property
    def num_samples(self) -> int:
        """The samples kept: one more than the intervals (merged ones count as one)."""
        num_intervals = len(self._fine) + len(self._coarse)
        return num_intervals + 1 if num_intervals else int(self._last_at is not None)

    @property
    def num_rows(self) -> int:
        """Tenant rows kept over all intervals (what the memory grows with)."""
        return sum(len(i.rows) for i in self._coarse) + sum(len(i.rows) for i in self._fine)


def _point_at(window: Sequence[_Interval], point: int) -> float:
    """Epoch seconds of the window's sample ``point`` (0: the first interval's start)."""
    return window[0].at0 if point == 0 else window[point - 1].at


def _concat(window: Sequence[_Interval]) -> np.ndarray:
    if not window:
        return np.zeros(0, dtype=_ROW)
    return np.concatenate([interval.rows for interval in window])


def _rows_of(active: Sequence[tuple[int, float, float, float, bool]], length: float) -> np.ndarray:
    """An interval's rows from its active tenants (index, service, cost, weight, backlogged
    over it): the share sums of the backlogged ones against each other."""
    rows = np.zeros(len(active), dtype=_ROW)
    if not active:
        return rows
    index, service, cost, weight, backlogged = zip(*active, strict=True)
    rows["tenant"] = index
    rows["service"] = service
    rows["cost"] = cost
    rows["weight"] = weight
    is_backlogged = np.array(backlogged, dtype=bool)
    weights = np.array(weight, dtype=np.float64)
    costs = rows["cost"]
    total_weight = float(weights[is_backlogged].sum())
    pool = float(costs[is_backlogged].sum())
    rows["flags"] = np.where(is_backlogged, _THROUGHOUT, 0)
    rows["backlogged_s"] = np.where(is_backlogged, length, 0.0)
    if total_weight > 0.0:
        rows["entitled_s"] = np.where(is_backlogged, length * weights / total_weight, 0.0)
    rows["own_cost"] = np.where(is_backlogged, costs, 0.0)
    rows["pool_cost"] = np.where(is_backlogged, pool, 0.0)
    return rows


def _merged(bucket: Sequence[_Interval]) -> _Interval:
    """Consecutive intervals as one: sums per tenant, its latest weight, backlogged
    throughout when it was in each of them."""
    rows = _concat(bucket)
    tenants, inverse = np.unique(rows["tenant"], return_inverse=True)
    merged = np.zeros(len(tenants), dtype=_ROW)
    merged["tenant"] = tenants
    for field in ("service", "cost", "own_cost", "pool_cost", "backlogged_s", "entitled_s"):
        merged[field] = np.bincount(inverse, weights=rows[field], minlength=len(tenants))
    latest = np.zeros(len(tenants), dtype=np.int64)
    np.maximum.at(latest, inverse, np.arange(len(rows)))  # rows are in time order
    merged["weight"] = rows["weight"][latest]
    num_throughout = np.bincount(
        inverse, weights=(rows["flags"] & _THROUGHOUT) != 0, minlength=len(tenants)
    )
    merged["flags"] = np.where(num_throughout == len(bucket), _THROUGHOUT, 0)
    first, last = bucket[0], bucket[-1]
    return _Interval(first.t0, last.t, first.at0, last.at, merged)

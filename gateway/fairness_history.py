"""Who was served what, while backlogged, over the last hour: the per-tenant samples behind the
dashboard's fairness charts (``series``) and the fairness receipts (``receipt``,
``GET /admin/v1/tenants/{tenant}/fairness``).

Sampled about once a second (``Gateway._sample_forever``) from ``GatewayMetrics``'s view of the
tenants (``TenantPoint``: weight, cumulative service, requests queued). Each sample keeps, per
tenant that was backlogged or served since the one before, the service it received in between,
so memory is a ring of ``horizon_s`` seconds of samples, each as large as the tenants active
then, and a sample costs O(tenants).

Two measures of service (``scheduling.md`` §1: ``w_in`` × computed prompt tokens + ``w_out`` ×
output tokens, times the model's cost factor):

- **service units**: divided by the weight the request ran at (``fairgate_tenant_service_units_
  total``). Fair weighted service gives backlogged tenants equal service units; the policies'
  bounds on the gap between two tenants are in these units.
- **cost units**: not divided; what a tenant's *share* of the work is measured in, against its
  entitled share ``weight / Σ weights`` of the backlogged tenants.

The interval between two samples counts as backlogged for a tenant when it had requests queued
at both samples (the policies' guarantees are for tenants continuously backlogged). Over a
window, for a tenant ``u``, with ``B_k`` the tenants backlogged over interval ``k`` and ``I_u``
the intervals where ``u`` was::

    entitled share = Σ_{k∈I_u} len_k · w_u / Σ_{v∈B_k} w_v   /  Σ_{k∈I_u} len_k
    received share = Σ_{k∈I_u} cost_u(k)  /  Σ_{k∈I_u} Σ_{v∈B_k} cost_v(k)

and the service gap to another tenant ``v`` is, over each run of consecutive intervals where
both were backlogged, the largest change of ``S_u − S_v`` (service units) between two samples
of the run: the largest gap over any interval in which both were backlogged, which is what
the policies bound. Torch-free.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

__all__ = [
    "DEFAULT_HORIZON_S",
    "FairnessHistory",
    "FairnessReceipt",
    "GapBound",
    "GapReport",
    "SeriesPoint",
    "TenantPoint",
    "TenantSeries",
]

DEFAULT_HORIZON_S = 3600.0
MIN_SAMPLE_INTERVAL_S = 0.5  # what the ring is sized for: samples closer than this crowd it


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
class _Entry:
    """One tenant in one sample: what it received since the sample before."""

    weight: float
    service_units: float
    cost_units: float
    is_backlogged: bool
    num_queued: int


@dataclass(frozen=True, slots=True)
class _Frame:
    t: float  # monotonic seconds: the intervals' lengths
    at: float  # epoch seconds: what the answers show
    entries: dict[str, _Entry]  # by tenant id: backlogged now, or served since the last


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
    what the tenant received in it; ``weight``: its weight at the last sample; ``backlogged_s``:
    how long it was backlogged; ``entitled_share`` / ``received_share``: over the intervals it
    was backlogged (None: it never was). ``max_gap``: the largest service gap to another tenant
    backlogged at the same time (None: none was). ``policy``, ``bound`` (service units, for the
    pair of ``max_gap``; None: the policy has none, or no gap) and ``bound_formula``: the
    policy's guarantee (``scheduling.md``) and the values it was computed from.
    ``within_bound``: every other tenant's gap is within its bound (None: no bound to check).
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


@dataclass(frozen=True, slots=True)
class GapBound:
    """A policy's bound on the service gap between two backlogged tenants (``scheduling.md``):
    VTC ``2U``, DLPM ``2(U + Q_u)``, D²LPM ``2·|W|·(U + Q_u)``, with ``U = w_in·L_input +
    w_out·M`` in cost units. In service units a request's charge is divided by its tenant's
    weight, so ``U`` becomes ``U / min(w_f, w_g)``; the deficits' quantum ``Q_u`` is charged in
    service units already. ``u_cost_units`` None: the policy has no bound (FCFS, RR-LPM), or
    its inputs are not known (no worker has said its context length or KV size)."""

    policy: str
    u_cost_units: float | None
    quantum: float = 0.0
    num_workers: int = 1
    formula: str = ""  # the bound with the values it uses, for people

    def between(self, weight_f: float, weight_g: float) -> float | None:
        if self.u_cost_units is None:
            return None
        u = self.u_cost_units / min(weight_f, weight_g)
        if self.policy == "vtc":
            return 2 * u
        if self.policy == "dlpm":
            return 2 * (u + self.quantum)
        if self.policy == "d2lpm":
            return 2 * self.num_workers * (u + self.quantum)
        return None


@dataclass(frozen=True, slots=True)
class _Window:
    """The frames of a window: intervals are between consecutive frames."""

    frames: list[_Frame]

    def backlogged(self, k: int) -> dict[str, float]:
        """Interval ``k`` (frames k-1 to k): its backlogged tenants, with their weights."""
        before, after = self.frames[k - 1].entries, self.frames[k].entries
        return {
            tenant_id: entry.weight
            for tenant_id, entry in after.items()
            if entry.is_backlogged and (b := before.get(tenant_id)) is not None and b.is_backlogged
        }


class FairnessHistory:
    """Per-tenant samples over ``horizon_s`` (module docstring). Called on the event loop."""

    def __init__(
        self,
        *,
        horizon_s: float = DEFAULT_HORIZON_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._wall_clock = wall_clock
        # Sized so that sampling at 2 Hz still holds the horizon; the times prune it first.
        self._frames: deque[_Frame] = deque(maxlen=math.ceil(horizon_s / MIN_SAMPLE_INTERVAL_S) + 2)
        self._last: dict[str, tuple[float, float]] = {}  # tenant id → cumulative service
        self._names: dict[str, str] = {}  # tenant id → name, weight: the last sample's
        self._weights: dict[str, float] = {}

    def sample(self, points: Iterable[TenantPoint]) -> None:
        now = self._clock()
        entries: dict[str, _Entry] = {}
        last: dict[str, tuple[float, float]] = {}
        names: dict[str, str] = {}
        weights: dict[str, float] = {}
        for point in points:
            names[point.tenant_id] = point.name
            weights[point.tenant_id] = point.weight
            before = self._last.get(point.tenant_id, (point.service_units, point.cost_units))
            service = point.service_units - before[0]
            cost = point.cost_units - before[1]
            last[point.tenant_id] = (point.service_units, point.cost_units)
            if point.num_queued > 0 or service or cost:
                entries[point.tenant_id] = _Entry(
                    point.weight, service, cost, point.num_queued > 0, point.num_queued
                )
        # Tenants the metrics forgot are dropped (one that is back starts from its total).
        self._last, self._names, self._weights = last, names, weights
        self._frames.append(_Frame(now, self._wall_clock(), entries))
        while self._frames and self._frames[0].t < now - self.horizon_s:
            self._frames.popleft()

    def _window(self, window_s: float) -> _Window:
        frames = list(self._frames)
        if not frames:
            return _Window([])
        since = frames[-1].t - min(window_s, self.horizon_s)
        return _Window([f for f in frames if f.t >= since])

    # ---- the dashboard ----------------------------------------------------------------------

    def series(self, window_s: float, *, max_points: int = 300) -> list[TenantSeries]:
        """Per tenant active in the window (backlogged or served), its chart: the window's
        intervals in at most ``max_points`` runs of consecutive ones, each a ``SeriesPoint``."""
        window = self._window(window_s)
        frames = window.frames
        num_intervals = len(frames) - 1
        if num_intervals < 1:
            return []
        per_point = math.ceil(num_intervals / max(1, max_points))
        tenants = sorted({t for f in frames[1:] for t in f.entries})
        points: dict[str, list[SeriesPoint]] = {t: [] for t in tenants}
        for first in range(1, num_intervals + 1, per_point):
            last = min(first + per_point - 1, num_intervals)
            totals = _Totals()
            for k in range(first, last + 1):
                totals.add(window, k)
            for tenant_id in tenants:
                points[tenant_id].append(totals.point(tenant_id, frames[last].at))
        return [
            TenantSeries(tenant_id, self.name_of(tenant_id), self._weight_of(tenant_id), pts)
            for tenant_id, pts in points.items()
        ]

    def received_shares(self, window_s: float) -> dict[str, float]:
        """By tenant backlogged in the window, its received share (module docstring)."""
        window = self._window(window_s)
        totals = _Totals()
        for k in range(1, len(window.frames)):
            totals.add(window, k)
        return {
            tenant_id: share
            for tenant_id in totals.backlogged_s
            if (share := totals.received_share(tenant_id)) is not None
        }

    # ---- receipts ---------------------------------------------------------------------------

    def receipt(self, tenant_id: str, window_s: float, bound: GapBound) -> FairnessReceipt:
        """The tenant's receipt over the last ``window_s`` (at most ``horizon_s``)."""
        window = self._window(window_s)
        frames = window.frames
        totals = _Totals()
        for k in range(1, len(frames)):
            totals.add(window, k)
        gaps = [
            gap
            for other in sorted({t for f in frames for t in f.entries} - {tenant_id})
            if (gap := self._gap(window, tenant_id, other, bound)) is not None
        ]
        largest = max(gaps, key=lambda g: g.units, default=None)
        verdicts = [g.within_bound for g in gaps]
        within: bool | None = None
        if bound.u_cost_units is not None:
            within = all(v is True for v in verdicts)
        notes: list[str] = []
        if bound.u_cost_units is None:
            notes.append(bound.formula)
        if len(frames) < 2:
            notes.append("fewer than two samples in the window: nothing to measure yet")
        elif totals.backlogged_s.get(tenant_id, 0.0) == 0.0:
            notes.append("the tenant was not backlogged in the window: no shares, no gap")
        elif largest is None:
            notes.append("no other tenant was backlogged at the same time: no gap")
        if within is False:
            over = [g.tenant for g in gaps if g.within_bound is False]
            notes.append("over the bound with: " + ", ".join(over))
        start = frames[0].at if frames else self._wall_clock()
        end = frames[-1].at if frames else start
        return FairnessReceipt(
            tenant_id=tenant_id,
            tenant=self.name_of(tenant_id),
            window_s=window_s,
            start=start,
            end=end,
            seconds=frames[-1].t - frames[0].t if frames else 0.0,
            num_samples=len(frames),
            service_units=totals.service.get(tenant_id, 0.0),
            cost_units=totals.cost.get(tenant_id, 0.0),
            weight=self._weight_of(tenant_id),
            backlogged_s=totals.backlogged_s.get(tenant_id, 0.0),
            entitled_share=totals.entitled_share(tenant_id),
            received_share=totals.received_share(tenant_id),
            max_gap=largest,
            policy=bound.policy,
            bound=None if largest is None else largest.bound,
            bound_formula=bound.formula,
            within_bound=within,
            note="; ".join(notes),
        )

    def _gap(self, window: _Window, f: str, g: str, bound: GapBound) -> GapReport | None:
        """The largest change of ``S_f − S_g`` within a run of intervals where both were
        backlogged (module docstring), with the bound for the smallest weight either had in
        that run; ``within_bound`` is every run's verdict. None when they never were
        backlogged at the same time."""
        frames = window.frames
        runs: list[_Run] = []
        run: _Run | None = None
        for k in range(1, len(frames)):
            backlogged = window.backlogged(k)
            if f not in backlogged or g not in backlogged:
                run = None
                continue
            if run is None:
                run = _Run([(frames[k - 1].at, 0.0)])
                runs.append(run)
            after = frames[k].entries
            diff = after[f].service_units - after[g].service_units
            run.points.append((frames[k].at, run.points[-1][1] + diff))
            run.min_weight = min(run.min_weight, backlogged[f], backlogged[g])
        if not runs:
            return None
        gaps = [(run.gap(), bound.between(run.min_weight, run.min_weight)) for run in runs]
        (units, start, end, is_ahead), limit = max(gaps, key=lambda gap: gap[0][0])
        within = None if limit is None else all(b is not None and u <= b for (u, *_), b in gaps)
        return GapReport(
            tenant_id=g,
            tenant=self.name_of(g),
            units=units,
            start=start,
            end=end,
            is_ahead=is_ahead,
            bound=limit,
            within_bound=within,
        )

    def name_of(self, tenant_id: str) -> str:
        return self._names.get(tenant_id, tenant_id)

    def _weight_of(self, tenant_id: str) -> float:
        return self._weights.get(tenant_id, 1.0)

    @property
    def num_samples(self) -> int:
        return len(self._frames)


@dataclass(slots=True)
class _Run:
    """Consecutive intervals where two tenants were both backlogged: (epoch s, ``S_f − S_g``
    since the run began) at each sample."""

    points: list[tuple[float, float]]
    min_weight: float = math.inf

    def gap(self) -> tuple[float, float, float, bool]:
        """The largest change of the difference between two of its samples: (units, from,
        to, whether ``f`` gained)."""
        low = min(range(len(self.points)), key=lambda i: self.points[i][1])
        high = max(range(len(self.points)), key=lambda i: self.points[i][1])
        first, last = sorted((low, high))
        units = self.points[high][1] - self.points[low][1]
        return units, self.points[first][0], self.points[last][0], high > low


class _Totals:
    """Sums over a set of intervals, per tenant (module docstring's formulas)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.service: dict[str, float] = {}
        self.cost: dict[str, float] = {}
        self.backlogged_s: dict[str, float] = {}
        self._entitled_s: dict[str, float] = {}  # Σ len · w_u / Σ w
        self._own_cost: dict[str, float] = {}  # Σ cost_u over its backlogged intervals
        self._all_cost: dict[str, float] = {}  # Σ Σ_{v∈B_k} cost_v over the same

    def add(self, window: _Window, k: int) -> None:
        frames = window.frames
        length = frames[k].t - frames[k - 1].t
        self.seconds += length
        entries = frames[k].entries
        for tenant_id, entry in entries.items():
            self.service[tenant_id] = self.service.get(tenant_id, 0.0) + entry.service_units
            self.cost[tenant_id] = self.cost.get(tenant_id, 0.0) + entry.cost_units
        backlogged = window.backlogged(k)
        total_weight = sum(backlogged.values())
        total_cost = sum(entries[t].cost_units for t in backlogged)
        for tenant_id, weight in backlogged.items():
            self.backlogged_s[tenant_id] = self.backlogged_s.get(tenant_id, 0.0) + length
            self._entitled_s[tenant_id] = (
                self._entitled_s.get(tenant_id, 0.0) + length * weight / total_weight
            )
            self._own_cost[tenant_id] = (
                self._own_cost.get(tenant_id, 0.0) + entries[tenant_id].cost_units
            )
            self._all_cost[tenant_id] = self._all_cost.get(tenant_id, 0.0) + total_cost

    def entitled_share(self, tenant_id: str) -> float | None:
        seconds = self.backlogged_s.get(tenant_id, 0.0)
        return self._entitled_s[tenant_id] / seconds if seconds > 0.0 else None

    def received_share(self, tenant_id: str) -> float | None:
        total = self._all_cost.get(tenant_id, 0.0)
        return self._own_cost[tenant_id] / total if total > 0.0 else None

    def point(self, tenant_id: str, at: float) -> SeriesPoint:
        rate = self.service.get(tenant_id, 0.0) / self.seconds if self.seconds > 0.0 else 0.0
        return SeriesPoint(at, rate, self.entitled_share(tenant_id), self.received_share(tenant_id))

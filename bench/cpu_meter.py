"""Where a benchmark's CPU went, and whether its load generator kept up.

On a 2-core machine the load generator, the gateway and the workers share the cores, so a
figure about the gateway means little without them: ``CpuMeter`` reads each process's CPU time
from ``/proc`` (Linux) over a window and reports it as a share of one core; ``LoopLag`` measures
how late this process's event loop wakes a timer (a loop that is always late sends late too).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from types import TracebackType

from bench.outcomes import percentile

__all__ = ["CpuMeter", "LoopLag", "measure_window"]

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
LAG_INTERVAL_S = 0.01


def _cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of a process so far; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its ')' do not.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime


class CpuMeter:
    """CPU used by named processes between ``start`` and ``stop``, in cores (1.0: one core busy
    the whole window). ``load_generator`` is this process."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = {**pids, "load_generator": os.getpid()}
        self._start: dict[str, float | None] = {}
        self._started_at = 0.0

    def start(self) -> None:
        self._started_at = time.perf_counter()
        self._start = {name: _cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall_s = time.perf_counter() - self._started_at
        used: dict[str, float] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), _cpu_s(pid)
            if before is not None and after is not None and wall_s > 0:
                used[name] = round((after - before) / wall_s, 3)
        return used


class LoopLag:
    """``async with LoopLag() as lag``: a timer every ``LAG_INTERVAL_S`` on this loop; ``lag``
    then holds how late each fired (``p50_ms``/``p99_ms``/``max_ms``)."""

    def __init__(self) -> None:
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            due = time.perf_counter() + LAG_INTERVAL_S
            await asyncio.sleep(LAG_INTERVAL_S)
            self.lags_s.append(max(0.0, time.perf_counter() - due))

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def figures(self) -> dict[str, float | None]:
        if not self.lags_s:
            return {"p50_ms": None, "p99_ms": None, "max_ms": None}
        return {
            "p50_ms": round(percentile(self.lags_s, 0.5) * 1e3, 2),
            "p99_ms": round(percentile(self.lags_s, 0.99) * 1e3, 2),
            "max_ms": round(max(self.lags_s) * 1e3, 2),
        }


async def measure_window(
    pids: Mapping[str, int], start: float, window_s: float
) -> tuple[dict[str, float], dict[str, float | None]]:
    """CPU per process (cores) and this loop's timer lag (ms) over ``[start, start +
    window_s)`` (``perf_counter`` times)."""
    meter = CpuMeter(pids)
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    meter.start()
    async with LoopLag() as lag:
        await asyncio.sleep(max(0.0, start + window_s - time.perf_counter()))
    return meter.stop(), lag.figures()

"""The graphs' data: a machine's or a hypervisor's points over a window, as uPlot reads them (columnar).

A window is a grid of slots one resolution apart, ending at the last slot whose interval is over (the
collection writes a minute's point once the minute has passed). Every slot is in the answer: a slot with no
point, or with a point that measured nothing (a stopped machine), is None in every series, so a stopped
period is a gap in the graph, not a line drawn across it. One query per answer, whatever the window.

`since=` (epoch seconds) answers only the slots after it, for a page that already has the rest: it sends the
timestamp of its last slot that had a point, and replaces what it holds after it with the answer (a slot that
was still empty when it last asked may have its point now).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db.models import Avg, Max
from django.db.models.functions import TruncHour

from metrics.models import HOST_COUNTED, HOST_MEASURED, MACHINE_RATES, HostSample, MachineSample, Resolution


def clock() -> float:
    """Now, in epoch seconds (tests set it)."""
    return time.time()


class BadWindow(ValueError):
    """A window or a since= that cannot be read: the message says what is accepted."""


@dataclass(frozen=True)
class Window:
    name: str
    step: int  # seconds between slots: the resolution of the points read
    slots: int

    @property
    def seconds(self) -> int:
        return self.step * self.slots


WINDOWS = {
    "hour": Window("hour", Resolution.MINUTE, 60),
    "day": Window("day", Resolution.MINUTE, 24 * 60),
    "month": Window("month", Resolution.HOUR, 30 * 24),
}
DEFAULT_WINDOW = "hour"

# What each graph reads, column by column (the JSON's series names are these).
MACHINE_FIELDS = (*MACHINE_RATES[:2], "memory_mib", *MACHINE_RATES[2:])
# What it was given: a count that a stopped interval still carries, left out (a gap) where it did not run.
GIVEN = {"memory_mib"}
HOST_FIELDS = (*HOST_MEASURED, *HOST_COUNTED)


def window_named(value: str | None) -> Window:
    """The window of ?window= (none given: the last hour)."""
    name = DEFAULT_WINDOW if value in (None, "") else value
    if name not in WINDOWS:
        raise BadWindow(f"window must be one of {', '.join(WINDOWS)}, not {str(value)[:40]!r}.")
    return WINDOWS[name]


def since_value(value: str | None) -> int | None:
    """?since= as epoch seconds (whole digits), or None when not given."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise BadWindow(f"since must be a time in whole seconds since 1970 (digits), not {text[:40]!r}.")
    return int(text)


def _grid(window: Window, since: int | None, now: float | None) -> tuple[int, int, int]:
    """First slot, last slot, step: the window's slots, or those after `since` within it."""
    step = window.step
    now = clock() if now is None else now
    end = int(now) // step * step - step  # the last interval that is over
    start = end - (window.slots - 1) * step
    if since is not None and since >= start:
        start = since // step * step + step
    return start, end, step


def _epoch(at: datetime) -> int:
    return int(at.timestamp())


def _columns(rows, fields: tuple[str, ...], start: int, end: int, step: int, ran=None) -> dict[str, Any]:
    """rows: (at, *fields) tuples; the columnar answer over every slot from start to end."""
    timestamps = list(range(start, end + 1, step)) if end >= start else []
    index = {t: i for i, t in enumerate(timestamps)}
    series: dict[str, list[float | None]] = {f: [None] * len(timestamps) for f in fields}
    for row in rows:
        i = index.get(_epoch(row[0]) // step * step)
        if i is None:
            continue
        running = ran(row) if ran else True
        for field, value in zip(fields, row[1 : len(fields) + 1], strict=True):
            if field in GIVEN and not running:
                value = None
            series[field][i] = None if value is None else round(float(value), 3)
    return {"step": step, "start": start, "end": end, "timestamps": timestamps, "series": series}


def _range(start: int, end: int) -> tuple[datetime, datetime]:
    return datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)


def machine_series(machine_id: int, window: Window, *, since: int | None = None, now: float | None = None) -> dict:
    """A machine's CPU, memory, disk and network over the window: {window, step, start, end, since,
    timestamps, series: {field: [value or None per slot]}}."""
    start, end, step = _grid(window, since, now)
    rows = []
    if end >= start:
        first, last = _range(start, end)
        rows = list(
            MachineSample.objects.filter(machine_id=machine_id, resolution=window.step, at__gte=first, at__lte=last)
            .order_by("at")
            .values_list("at", *MACHINE_FIELDS, "seconds_running")
        )
    data = _columns(rows, MACHINE_FIELDS, start, end, step, ran=lambda row: row[-1] > 0)
    return {"window": window.name, "since": since, **data}


def host_series(hypervisor_id: int, window: Window, *, since: int | None = None, now: float | None = None) -> dict:
    """A hypervisor's CPU and memory, and what its machines were given against its capacity, over the window
    (the same shape as machine_series)."""
    start, end, step = _grid(window, since, now)
    rows = []
    if end >= start:
        first, last = _range(start, end)
        rows = list(
            HostSample.objects.filter(hypervisor_id=hypervisor_id, resolution=window.step, at__gte=first, at__lte=last)
            .order_by("at")
            .values_list("at", *HOST_FIELDS)
        )
    data = _columns(rows, HOST_FIELDS, start, end, step)
    return {"window": window.name, "since": since, **data}


# The dashboard's sparklines: each hypervisor's memory given to machines against its capacity over the last 24
# hours, one value an hour (the hour's minute points averaged by the database: one query for every host, and the
# hour under way is there before any rollup).
SPARK_HOURS = 24
SPARK_WIDTH, SPARK_HEIGHT = 96, 20
# The line's top: a quarter above its peak, so a trend shows even on a host a tenth full, and never below 25 %,
# so a nearly idle host is not drawn as a full one (the bar beside it, and the tooltip, give the figures).
SPARK_FLOOR = 25.0


def sparklines(hypervisor_ids, *, now: float | None = None) -> dict[int, dict]:
    """{hypervisor id: {"values": [per cent or None per hour, oldest first], "segments": [SVG polyline
    points], "last": last value, "peak": highest}} for those that have points in the last 24 hours."""
    now = clock() if now is None else now
    end = int(now) // 3600 * 3600
    start = end - (SPARK_HOURS - 1) * 3600
    rows = (
        HostSample.objects.filter(
            hypervisor_id__in=list(hypervisor_ids),
            resolution=Resolution.MINUTE,
            at__gte=datetime.fromtimestamp(start, UTC),
            memory_capacity_mib__gt=0,
        )
        .annotate(hour=TruncHour("at", tzinfo=UTC))
        .values("hypervisor_id", "hour")
        .annotate(allocated=Avg("memory_allocated_mib"), capacity=Max("memory_capacity_mib"))
        .order_by()
    )
    values: dict[int, list[float | None]] = {}
    for row in rows:
        i = (_epoch(row["hour"]) - start) // 3600
        if 0 <= i < SPARK_HOURS:
            column = values.setdefault(row["hypervisor_id"], [None] * SPARK_HOURS)
            column[i] = round(100.0 * row["allocated"] / row["capacity"], 1)
    out = {}
    for hv_id, column in values.items():
        seen = [v for v in column if v is not None]
        out[hv_id] = {
            "values": column,
            "segments": polyline_segments(column, top=min(max(max(seen) * 1.25, SPARK_FLOOR), 100.0)),
            "last": next(v for v in reversed(column) if v is not None),
            "peak": max(seen),
        }
    return out


def polyline_segments(
    values: list[float | None], width: int = SPARK_WIDTH, height: int = SPARK_HEIGHT, top: float = 100.0
) -> list[str]:
    """Values from 0 to `top` as SVG polyline `points`, one per run without a gap; a lone point is a short
    flat stroke so that it shows."""
    if not values:
        return []
    top = top if top > 0 else 100.0
    dx = width / max(len(values) - 1, 1)
    segments: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    for i, value in enumerate(values):
        if value is None:
            if current:
                segments.append(current)
            current = []
            continue
        y = height - 1 - (height - 2) * min(max(value, 0.0), top) / top
        current.append((round(i * dx, 1), round(y, 1)))
    if current:
        segments.append(current)
    out = []
    for points in segments:
        if len(points) == 1:
            x, y = points[0]
            points = [(max(x - 1.5, 0.0), y), (min(x + 1.5, float(width)), y)]
        out.append(" ".join(f"{x:g},{y:g}" for x, y in points))
    return out

"""Hourly points and usage rows from the minute points, and what is kept how long.

rollup() (the hourly metrics_rollup_task) takes every complete hour after the last one rolled up (the latest
HOUR point) and writes, per machine and per hypervisor, one HOUR point: rates averaged over the hour's minute
points, seconds running summed, what it was given at most; and per machine one UsageHour row (vCPU-hours and
memory GiB-hours from the minute points' seconds running, disk GiB-days from the minutes it existed, each minute
point counting 60 s). Then minute points older than PORTAL_METRICS_MINUTE_RETENTION_HOURS and hour points older
than PORTAL_METRICS_HOUR_RETENTION_DAYS are deleted. A second run changes nothing (inserts skip rows that exist,
the unique constraints guard every point and usage row).

A machine being deleted takes its points with it (cascade): on_machine_delete writes its usage rows for the
hours not rolled up yet (the current one included) first, so the usage report still counts it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Avg, Count, F, Max, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from machines.models import Machine
from metrics.models import HOST_COUNTED, HOST_MEASURED, MACHINE_RATES, HostSample, MachineSample, Resolution, UsageHour

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
# How long after an hour ends its last minute points may still come (a point's minute is the middle of the
# interval between two reads, written at the second one).
SETTLE = timedelta(minutes=3)


def _hour_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def rollup(now: datetime | None = None) -> dict[str, int]:
    """Roll up the complete hours not rolled up yet, then drop what is past retention; what it wrote and
    deleted, counted."""
    now = now or timezone.now()
    end = _hour_floor(now - SETTLE)  # hours before this one are complete
    counts = {"machine_hours": 0, "host_hours": 0, "usage_rows": 0}
    with transaction.atomic():
        last = MachineSample.objects.filter(resolution=Resolution.HOUR).aggregate(at=Max("at"))["at"]
        last_host = HostSample.objects.filter(resolution=Resolution.HOUR).aggregate(at=Max("at"))["at"]
        counts["machine_hours"], counts["usage_rows"] = _roll_machines(after=last, end=end)
        counts["host_hours"] = _roll_hosts(after=last_host, end=end)
    counts.update(prune(now))
    log.info("metrics rollup: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def _minutes(model: type[MachineSample] | type[HostSample], *, after: datetime | None, end: datetime) -> Any:
    minutes = model.objects.filter(resolution=Resolution.MINUTE, at__lt=end)
    if after is not None:
        minutes = minutes.filter(at__gte=after + HOUR)
    return minutes.annotate(hour=TruncHour("at", tzinfo=UTC)).order_by()


def _machine_hours(minutes: Any) -> Any:
    """Per machine and hour: the averages, sums and maxima of its minute points, and who it was (one query)."""
    who = ("machine__uuid", "machine__name", "machine__owner_id", "machine__project_id")
    return minutes.values("machine_id", "hour", *who).annotate(
        **{f"avg_{name}": Avg(name) for name in MACHINE_RATES},
        running=Sum("seconds_running"),
        points=Count("pk"),
        max_vcpus=Max("vcpus"),
        max_memory_mib=Max("memory_mib"),
        max_disk_gib=Max("disk_gib"),
        vcpu_seconds=Sum(F("vcpus") * F("seconds_running")),
        memory_mib_seconds=Sum(F("memory_mib") * F("seconds_running")),
        disk_gib_points=Sum("disk_gib"),
    )


def _usage_row(row: dict, *, deleted: bool = False) -> UsageHour:
    """The usage row of one machine-hour; of a machine being deleted, without the link to it (its delete
    collected what points to it before these rows were written)."""
    return UsageHour(
        at=row["hour"],
        machine_id=None if deleted else row["machine_id"],
        machine_uuid=row["machine__uuid"],
        machine_name=row["machine__name"],
        owner_id=row["machine__owner_id"],
        project_id=row["machine__project_id"],
        vcpu_hours=(row["vcpu_seconds"] or 0) / 3600,
        memory_gib_hours=(row["memory_mib_seconds"] or 0) / 1024 / 3600,
        disk_gib_days=(row["disk_gib_points"] or 0) * 60 / 86400,
    )


def _roll_machines(*, after: datetime | None, end: datetime) -> tuple[int, int]:
    points, usage = [], []
    for row in _machine_hours(_minutes(MachineSample, after=after, end=end)):
        points.append(
            MachineSample(
                machine_id=row["machine_id"],
                resolution=Resolution.HOUR,
                at=row["hour"],
                seconds_running=min(row["running"] or 0, 3600),
                vcpus=row["max_vcpus"] or 0,
                memory_mib=row["max_memory_mib"] or 0,
                disk_gib=row["max_disk_gib"] or 0,
                **{name: row[f"avg_{name}"] for name in MACHINE_RATES},
            )
        )
        usage.append(_usage_row(row))
    MachineSample.objects.bulk_create(points, ignore_conflicts=True)
    UsageHour.objects.bulk_create(usage, ignore_conflicts=True)
    return len(points), len(usage)


def _roll_hosts(*, after: datetime | None, end: datetime) -> int:
    rows = (
        _minutes(HostSample, after=after, end=end)
        .values("hypervisor_id", "hour")
        .annotate(
            **{f"avg_{name}": Avg(name) for name in HOST_MEASURED},
            **{f"max_{name}": Max(name) for name in HOST_COUNTED},
        )
    )
    points = [
        HostSample(
            hypervisor_id=row["hypervisor_id"],
            resolution=Resolution.HOUR,
            at=row["hour"],
            **{name: row[f"avg_{name}"] for name in HOST_MEASURED},
            **{name: row[f"max_{name}"] if row[f"max_{name}"] is not None else _zero(name) for name in HOST_COUNTED},
        )
        for row in rows
    ]
    HostSample.objects.bulk_create(points, ignore_conflicts=True)
    return len(points)


def _zero(name: str) -> float | int | None:
    return None if name == "memory_total_mib" else 0


def prune(now: datetime | None = None) -> dict[str, int]:
    """Delete minute points older than PORTAL_METRICS_MINUTE_RETENTION_HOURS, hour points older than
    PORTAL_METRICS_HOUR_RETENTION_DAYS (machines' and hosts')."""
    now = now or timezone.now()
    minute_cut = now - timedelta(hours=settings.PORTAL_METRICS_MINUTE_RETENTION_HOURS)
    hour_cut = now - timedelta(days=settings.PORTAL_METRICS_HOUR_RETENTION_DAYS)
    deleted = 0
    for model in (MachineSample, HostSample):
        deleted += model.objects.filter(resolution=Resolution.MINUTE, at__lt=minute_cut).delete()[0]
        deleted += model.objects.filter(resolution=Resolution.HOUR, at__lt=hour_cut).delete()[0]
    return {"deleted": deleted}


def on_machine_delete(sender: Any, instance: Machine, **kwargs: Any) -> None:
    """pre_delete of a Machine: its usage rows of the hours not rolled up yet, before its points go with it."""
    last = MachineSample.objects.filter(resolution=Resolution.HOUR).aggregate(at=Max("at"))["at"]
    minutes = MachineSample.objects.filter(machine_id=instance.pk, resolution=Resolution.MINUTE)
    if last is not None:
        minutes = minutes.filter(at__gte=last + HOUR)
    rows = _machine_hours(minutes.annotate(hour=TruncHour("at", tzinfo=UTC)).order_by())
    UsageHour.objects.bulk_create([_usage_row(row, deleted=True) for row in rows], ignore_conflicts=True)

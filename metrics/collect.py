"""One-minute points from the reconcile's bulk reads.

Every reconcile cycle reads each hypervisor once (driver.domains_observed: one getAllDomainStats for every
domain's state, CPU time, vCPUs, balloon, disk and NIC counters, and the host's CPU and memory counters) and sends
machines.services.observation.host_observed. Here, the read is compared with the previous one, kept in the
hypervisor's HostCounters row: the differences over the wall time between the two reads are the rates of a
MINUTE MachineSample per machine and of a MINUTE HostSample, at the minute that holds most of that interval.

- The first read of a hypervisor is a baseline only.
- Reads less than MIN_INTERVAL seconds after the baseline (the reconcile also runs on demand, after power
  actions) write nothing and keep the older baseline, so a minute's rates always span at least that long.
- A baseline older than MAX_INTERVAL (the reconcile was stopped) is replaced without a point.
- A domain that restarted (a new run: libvirt's domain id) or whose counters went backwards gets no rates this
  time; the new read is its baseline.
- A point for a minute that has one already is skipped (the first one stays).
- Machines off or without a domain get a point too: no rates, 0 seconds running, and what they are given
  (vCPUs, memory, disk), which the usage report counts.

The queries per hypervisor do not depend on its number of machines (bulk inserts, batched by the database's
parameter limit only)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import Q

from hypervisors.drivers.base import DomainCounters, HostObserved, PowerState
from hypervisors.models import Hypervisor
from machines.capacity import usage_by
from machines.models import Machine
from machines.states import Status
from metrics.models import MACHINE_RATES, HostCounters, HostSample, MachineSample, Resolution

log = logging.getLogger(__name__)

MIN_INTERVAL = 30.0  # seconds: reads closer to the baseline than this write no point
MAX_INTERVAL = 600.0  # seconds: a baseline older than this is replaced without a point
MINUTE = 60


def on_host_observed(
    sender: Any, *, hypervisor_id: int, observed: HostObserved, read_at: float, read_seconds: float, **kwargs: Any
) -> None:
    """host_observed's receiver (connected in MetricsConfig.ready)."""
    collect(hypervisor_id, observed, read_at=read_at, read_seconds=read_seconds)


def _state(observed: HostObserved) -> tuple[dict, dict]:
    """The read as HostCounters keeps it: the host's counters, and per domain its run (-1 unless running) and
    counters."""
    host = dict(vars(observed.counters)) if observed.counters is not None else {}
    domains = {}
    for uuid, seen in observed.domains.items():
        running = seen.state == PowerState.RUNNING
        domains[uuid] = {
            "run": seen.run if running else -1,
            **(vars(seen.counters) if running and seen.counters is not None else {}),  # flat: no asdict's deep copy
        }
    return host, domains


def minute_of(seconds: float) -> datetime:
    """The start of the minute that holds this epoch time, aware (UTC)."""
    return datetime.fromtimestamp(math.floor(seconds / MINUTE) * MINUTE, tz=UTC)


def collect(hypervisor_id: int, observed: HostObserved, *, read_at: float, read_seconds: float = 0.0) -> int:
    """Points from one bulk read of a hypervisor against its baseline (see above); the number of machine
    points written."""
    host, domains = _state(observed)
    with transaction.atomic():
        previous = HostCounters.objects.select_for_update().filter(hypervisor_id=hypervisor_id).first()
        if previous is None:
            HostCounters.objects.create(
                hypervisor_id=hypervisor_id, read_at=read_at, read_seconds=read_seconds, host=host, domains=domains
            )
            return 0
        dt = read_at - previous.read_at
        if dt < MIN_INTERVAL:
            return 0  # too close to the baseline (or an older read come back late): the older baseline stays
        written = 0
        if dt <= MAX_INTERVAL:
            at = minute_of((previous.read_at + read_at) / 2)
            written = _write_points(hypervisor_id, previous, observed, host, domains, at=at, dt=dt)
        HostCounters.objects.filter(pk=previous.pk).update(
            read_at=read_at, read_seconds=read_seconds, host=host, domains=domains
        )
    return written


def _delta(now: dict, before: dict, key: str) -> int | None:
    a, b = now.get(key), before.get(key)
    return None if a is None or b is None else a - b


def _rate(value: int | None, dt: float) -> float | None:
    return None if value is None else value / dt


def machine_rates(now: dict, before: dict | None, *, dt: float, vcpus: int) -> dict[str, Any]:
    """A machine's point from two reads of its domain (their HostCounters form, `before` None when the
    baseline had no such domain): seconds running of the minute and its rates. Rates only for the same run at
    both reads with no counter gone backwards; CPU per cent of its vCPUs (100: all of them busy all the time)."""
    span = min(dt, float(MINUTE))
    running_now = now.get("run", -1) >= 0
    running_before = before is not None and before.get("run", -1) >= 0
    same_run = running_now and running_before and before is not None and before["run"] == now["run"]
    point: dict[str, Any] = dict.fromkeys(MACHINE_RATES)
    # Running at both reads: the whole interval; at one of them (started, stopped, restarted): half of it.
    point["seconds_running"] = round(span if same_run else span / 2 if running_now or running_before else 0)
    if running_now:
        available, unused, rss = (
            now.get("memory_available_kib"),
            now.get("memory_unused_kib"),
            now.get("memory_rss_kib"),
        )
        if available is not None and unused is not None:
            point["memory_used_mib"] = max(available - unused, 0) / 1024
        elif rss is not None:
            point["memory_used_mib"] = rss / 1024
    if not same_run or before is None:
        return point
    deltas = {key: _delta(now, before, key) for key in COUNTERS}
    if any(d is not None and d < 0 for d in deltas.values()):
        return point  # counters went backwards (a reset we did not see as a new run): no rates this time
    cpu = deltas["cpu_time_ns"]
    cpus = now.get("vcpus") or vcpus
    if cpu is not None and cpus:
        point["cpu_pct"] = min(cpu / (dt * 1e9 * cpus) * 100, 100.0)
    point["disk_read_bps"] = _rate(deltas["disk_read_bytes"], dt)
    point["disk_write_bps"] = _rate(deltas["disk_write_bytes"], dt)
    point["disk_read_iops"] = _rate(deltas["disk_read_reqs"], dt)
    point["disk_write_iops"] = _rate(deltas["disk_write_reqs"], dt)
    point["net_rx_bps"] = _rate(deltas["net_rx_bytes"], dt)
    point["net_tx_bps"] = _rate(deltas["net_tx_bytes"], dt)
    return point


COUNTERS = tuple(asdict(DomainCounters()))


def host_rates(now: dict, before: dict) -> dict[str, float | None]:
    """The host's CPU busy per cent of all its CPUs over the interval, and its memory at the read (MiB; used:
    total less free, buffers and page cache)."""
    busy, idle = _delta(now, before, "cpu_busy_ns"), _delta(now, before, "cpu_idle_ns")
    cpu = None
    if busy is not None and idle is not None and busy >= 0 and idle >= 0 and busy + idle > 0:
        cpu = busy / (busy + idle) * 100
    total = now.get("memory_total_kib")
    used = None
    if total is not None and now.get("memory_free_kib") is not None:
        spare = sum(now.get(k) or 0 for k in ("memory_free_kib", "memory_buffers_kib", "memory_cached_kib"))
        used = max(total - spare, 0) / 1024
    return {"cpu_pct": cpu, "memory_used_mib": used, "memory_total_mib": None if total is None else total / 1024}


def _write_points(
    hypervisor_id: int,
    previous: HostCounters,
    observed: HostObserved,
    host: dict,
    domains: dict,
    *,
    at: datetime,
    dt: float,
) -> int:
    hv = Hypervisor.objects.filter(pk=hypervisor_id).values("cpus", "memory_mib", "cpu_allocation_ratio").first()
    if hv is None:
        return 0
    # What its machines are given, as placement counts it (machines.capacity): those on it and those moving to it.
    here = Machine.objects.filter(Q(hypervisor_id=hypervisor_id) | Q(moving_to_id=hypervisor_id)).exclude(
        status=Status.NEW
    )
    given = usage_by(here, "pk")
    mine = dict(here.filter(hypervisor_id=hypervisor_id).values_list("pk", "uuid"))
    samples, running = [], 0
    for pk, uuid in mine.items():
        holds = given.get(pk, {"vcpus": 0, "memory_mib": 0, "disk_gib": 0})
        now = domains.get(str(uuid), {"run": -1})
        point = machine_rates(now, previous.domains.get(str(uuid)), dt=dt, vcpus=holds["vcpus"])
        running += now["run"] >= 0
        samples.append(
            MachineSample(
                machine_id=pk,
                resolution=Resolution.MINUTE,
                at=at,
                vcpus=holds["vcpus"],
                memory_mib=holds["memory_mib"],
                disk_gib=holds["disk_gib"],
                **point,
            )
        )
    MachineSample.objects.bulk_create(samples, ignore_conflicts=True)
    cpus = hv["cpus"] or host.get("cpus") or 0
    rates = host_rates(host, previous.host)
    HostSample.objects.bulk_create(
        [
            HostSample(
                hypervisor_id=hypervisor_id,
                resolution=Resolution.MINUTE,
                at=at,
                **rates,
                vcpus_allocated=sum(u["vcpus"] for u in given.values()),
                vcpus_capacity=int(cpus * Decimal(hv["cpu_allocation_ratio"])),
                memory_allocated_mib=sum(u["memory_mib"] for u in given.values()),
                memory_capacity_mib=hv["memory_mib"] or round(rates["memory_total_mib"] or 0),
                disk_allocated_gib=sum(u["disk_gib"] for u in given.values()),
                machines_running=running,
            )
        ],
        ignore_conflicts=True,
    )
    return len(samples)

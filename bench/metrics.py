"""Metrics (issue 17): what collecting costs the reconcile, and what the points cost on disk.

1. Collection: HOSTS `test:///` hypervisors (libvirt's test driver, each loading a file of DOMAINS domains, 70 %
   running) x DOMAINS machines, in a throwaway SQLite database. The reconcile's real bulk read runs against them;
   the test driver tells no domain counters, so each running domain's are made up in the read (a CPU time, balloon,
   disk and NIC counters that grow), as a QEMU host's would be. One cycle without the metrics receiver (the
   baseline) and cycles with it, in the same run: time and SQL statements (all of them, per hypervisor too).
2. Storage: MACHINES machines on one hypervisor, a day of reads a minute apart through metrics.collect, then the
   rollup at the day's end; the SQLite tables' and indexes' bytes (dbstat) per machine: the one-minute window
   (24 h of points, kept a day), and what a day adds for good (hour points, kept 90 days, and usage rows).

Prints figures; asserts nothing. Needs no daemon.

Run: `.venv/bin/python bench/metrics.py [HOSTS] [DOMAINS] [MACHINES]` (default 100 100 100).
"""

import os
import sys
import tempfile
import time
import uuid as uuidlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
DATA = tempfile.mkdtemp(prefix="portal-bench-metrics-")
os.environ.update(
    {
        "PORTAL_DATA_DIR": DATA,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PORTAL_ALLOW_TEST_URIS": "true",
        "PORTAL_SCREENSHOTS_PER_MINUTE": "0",  # the screenshot batch is not the reconcile's
    }
)

import logging  # noqa: E402

import django  # noqa: E402

from bench.common import run_main  # noqa: E402

django.setup()
logging.getLogger("machines").setLevel(logging.WARNING)
logging.getLogger("hypervisors").setLevel(logging.WARNING)
logging.getLogger("metrics").setLevel(logging.WARNING)

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from hypervisors.drivers import libvirt_driver  # noqa: E402
from hypervisors.drivers.base import DomainCounters, HostObserved, PowerState  # noqa: E402

HOSTS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
DOMAINS = int(sys.argv[2]) if len(sys.argv) > 2 else 100
MACHINES = int(sys.argv[3]) if len(sys.argv) > 3 else 100

statements: Counter = Counter()
spent: list[float] = []  # seconds in the metrics receiver, per hypervisor, this cycle


def count(execute, sql, params, many, context):
    statements[sql.lstrip().split(" ", 1)[0].upper()] += 1
    return execute(sql, params, many, context)


# --- counters the test driver does not tell --------------------------------------------------------------

_tick = {"n": 0}


def made_up(uuid: str, n: int) -> DomainCounters:
    """Counters that grow with every read, different per domain (as a busy guest's would)."""
    k = (uuidlib.UUID(uuid).int % 97) + 1
    return DomainCounters(
        cpu_time_ns=n * k * 10**8,
        vcpus=1,
        memory_current_kib=65536,
        memory_available_kib=60000,
        memory_unused_kib=20000 + k,
        memory_rss_kib=70000,
        disk_read_bytes=n * k * 4096,
        disk_write_bytes=n * k * 8192,
        disk_read_reqs=n * k,
        disk_write_reqs=n * k * 2,
        net_rx_bytes=n * k * 1500,
        net_tx_bytes=n * k * 700,
    )


def with_counters(observed: HostObserved, n: int) -> HostObserved:
    domains = {
        u: replace(seen, counters=made_up(u, n)) if seen.state == PowerState.RUNNING else seen
        for u, seen in observed.domains.items()
    }
    return replace(observed, domains=domains)


_real_observed = libvirt_driver.LibvirtDriver.domains_observed


def observed_with_counters(self):
    return with_counters(_real_observed(self), _tick["n"])


libvirt_driver.LibvirtDriver.domains_observed = observed_with_counters

# --- the fleet -------------------------------------------------------------------------------------------


def host_file(i: int, uuids: list[str]) -> str:
    doms = []
    for n, u in enumerate(uuids):
        off = "<test:runstate>5</test:runstate>" if n % 10 >= 7 else ""
        doms.append(
            f"""<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>h{i}d{n}</name><uuid>{u}</uuid><memory>65536</memory><vcpu>1</vcpu>
  <os><type>hvm</type></os><devices><graphics type='vnc' port='-1' passwd='x'/></devices>{off}
</domain>"""
        )
    path = Path(DATA) / f"host{i}.xml"
    path.write_text(f"<node>{''.join(doms)}</node>")
    return f"test://{path}"


def build(owner, hosts: int, domains: int, *, files: bool = True) -> list:
    from hypervisors.models import Hypervisor
    from machines.models import Machine, MachineObserved

    machines, fleet = [], []
    for i in range(hosts):
        uuids = [str(uuidlib.uuid4()) for _ in range(domains)]
        uri = host_file(i, uuids) if files else f"test:///storage{i}"
        hv = Hypervisor.objects.create(
            name=f"{'hv' if files else 'st'}{i}", uri=uri, status="online", cpus=32, memory_mib=131072
        )
        fleet.append(hv)
        for n, u in enumerate(uuids):
            machines.append(
                Machine(
                    name=f"{hv.name}d{n}",
                    uuid=u,
                    owner=owner,
                    hypervisor=hv,
                    deploy_type="network",
                    status="active",
                    power_state="unknown",
                    vcpus=1,
                    memory_mib=64,
                    disk_gib=10,
                )
            )
    made = Machine.objects.bulk_create(machines, batch_size=500)
    MachineObserved.objects.bulk_create([MachineObserved(machine=m) for m in made], batch_size=500)
    return fleet


# --- 1. collection ---------------------------------------------------------------------------------------


_real_time, _real_monotonic = time.time, time.monotonic


class Clock:
    """The reconcile's clock, a minute later at every cycle: each cycle's points fall in a minute of their own, as
    the crontab's cycles' do (wall time otherwise; its monotonic clock is the real one)."""

    offset = 0.0
    monotonic = staticmethod(_real_monotonic)

    @staticmethod
    def time() -> float:
        return _real_time() + Clock.offset


def cycle(label: str, fleet, *, metrics: bool):
    from machines.services import observation
    from metrics.collect import on_host_observed

    def timed(sender, **kwargs):
        began = time.monotonic()
        on_host_observed(sender, **kwargs)
        spent.append(time.monotonic() - began)

    spent.clear()
    observation.host_observed.disconnect(dispatch_uid="metrics.collect")
    if metrics:
        observation.host_observed.connect(timed, dispatch_uid="metrics.collect", weak=False)
    observation.time = Clock  # type: ignore[assignment]
    Clock.offset += 60
    _tick["n"] += 1
    statements.clear()
    start = time.monotonic()
    with connection.execute_wrapper(count):
        observation._reconcile_many(fleet)
    took = time.monotonic() - start
    total = sum(statements.values())
    print(
        f"  {label:52s} {took:6.2f} s  SQL {total:5d} statements ({total / len(fleet):5.1f} per hypervisor: "
        + ", ".join(f"{k} {v}" for k, v in statements.most_common(5))
        + ")"
        + (f"; in the collection {sum(spent):.2f} s" if spent else "")
    )
    return took, total, sum(spent)


def collection(owner) -> None:
    from machines.models import Machine
    from machines.services import observation
    from metrics.models import HostSample, MachineSample

    started = time.monotonic()
    fleet = build(owner, HOSTS, DOMAINS)
    print(
        f"collection: {HOSTS} test:/// hypervisors x {DOMAINS} domains ({Machine.objects.count()} machines, 70 % "
        f"running), {observation.RECONCILE_THREADS} threads; built in {time.monotonic() - started:.1f} s"
    )
    cycle("warm-up: first cycle, no metrics (all seen anew)", fleet, metrics=False)
    bases = [cycle(f"baseline: the reconcile without metrics ({n + 1})", fleet, metrics=False) for n in range(2)]
    base, base_sql = min(t for t, _, _ in bases), bases[-1][1]
    cycle("with metrics, first read (baselines only)", fleet, metrics=True)
    runs = [cycle(f"with metrics, a minute later ({n + 1})", fleet, metrics=True) for n in range(3)]
    took = min(t for t, _, _ in runs)
    sql = runs[-1][1]
    collecting = sorted(c for _, _, c in runs)[len(runs) // 2]
    print(
        f"    fastest cycles: {base:.2f} s without, {took:.2f} s with metrics; the collection itself (median) "
        f"{collecting:.2f} s a cycle, {collecting / HOSTS * 1000:.1f} ms and {(sql - base_sql) / HOSTS:.1f} SQL "
        f"statements per hypervisor of {DOMAINS} machines; {MachineSample.objects.count()} machine and "
        f"{HostSample.objects.count()} host points written"
    )


# --- 2. storage ------------------------------------------------------------------------------------------


def table_bytes() -> dict[str, int]:
    """Bytes of each metrics table with its indexes (SQLite's dbstat)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT m.tbl_name, SUM(s.pgsize) FROM dbstat s JOIN sqlite_master m ON m.name = s.name "
            "WHERE m.tbl_name LIKE 'metrics_%' GROUP BY m.tbl_name"
        )
        return dict(cursor.fetchall())


def rows() -> dict[str, int]:
    from metrics.models import HostSample, MachineSample, Resolution, UsageHour

    return {
        "minute points": MachineSample.objects.filter(resolution=Resolution.MINUTE).count(),
        "hour points": MachineSample.objects.filter(resolution=Resolution.HOUR).count(),
        "usage rows": UsageHour.objects.count(),
        "host points": HostSample.objects.count(),
    }


def storage(owner) -> None:
    from datetime import UTC, datetime, timedelta

    from django.db import connection as conn

    from hypervisors.drivers.base import DomainObserved, HostCountersRead
    from metrics.collect import collect
    from metrics.models import HostCounters, HostSample, MachineSample, UsageHour
    from metrics.rollup import rollup

    MachineSample.objects.all().delete()
    HostSample.objects.all().delete()
    HostCounters.objects.all().delete()
    UsageHour.objects.all().delete()
    (hv,) = build(owner, 1, MACHINES, files=False)
    uuids = [str(u) for u in hv.machines.values_list("uuid", flat=True)]
    t0 = datetime(2027, 1, 15, tzinfo=UTC).timestamp()
    conn.cursor().execute("PRAGMA synchronous=OFF")  # bytes measured here, not time: no fsync per read
    started = time.monotonic()
    for n in range(24 * 60 + 2):  # a day of minutes (and the read that closes the last one)
        observed = HostObserved(
            domains={u: DomainObserved(state=PowerState.RUNNING, run=1, counters=made_up(u, n)) for u in uuids},
            leases={},
            counters=HostCountersRead(cpus=32, cpu_busy_ns=n * 10**10, cpu_idle_ns=n * 3 * 10**10, memory_total_kib=1),
        )
        collect(hv.pk, observed, read_at=t0 + 60 * n + 1)
    took = time.monotonic() - started
    conn.cursor().execute("VACUUM")
    day = table_bytes()
    counted = rows()
    rollup(now=datetime.fromtimestamp(t0, tz=UTC) + timedelta(days=1, minutes=10))
    conn.cursor().execute("VACUUM")
    rolled = table_bytes()
    after = rows()
    minute_bytes = day.get("metrics_machinesample", 0) / MACHINES
    hour_bytes = (rolled.get("metrics_machinesample", 0) - day.get("metrics_machinesample", 0)) / MACHINES
    usage_bytes = rolled.get("metrics_usagehour", 0) / MACHINES
    print(
        f"storage: {MACHINES} machines, a day of one-minute reads through metrics.collect "
        f"({took:.1f} s without fsync), then the rollup; SQLite tables with their indexes, after VACUUM:"
    )
    print(f"    rows after the day: {counted}; after the rollup: {after}")
    print(
        f"    one-minute points: {minute_bytes / 1024:.1f} KiB per machine per day "
        f"({minute_bytes / max(counted['minute points'] / MACHINES, 1):.0f} B a point), the 24 h window they keep"
    )
    print(
        f"    a day's hour points: {hour_bytes / 1024:.2f} KiB per machine "
        f"(kept 90 days: {hour_bytes * 90 / 1024 / 1024:.2f} MiB per machine); "
        f"usage rows: {usage_bytes / 1024:.2f} KiB per machine per day, kept"
    )
    print(
        f"    steady state per machine: {(minute_bytes + 90 * hour_bytes) / 1024 / 1024:.2f} MiB of points, "
        f"growing {usage_bytes / 1024:.2f} KiB a day (usage); host points: "
        f"{rolled.get('metrics_hostsample', 0) / 1024:.0f} KiB per hypervisor per day"
    )


def main():
    from django.contrib.auth import get_user_model

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create_user("owner")
    collection(owner)
    storage(owner)


if __name__ == "__main__":
    run_main(main, DATA)

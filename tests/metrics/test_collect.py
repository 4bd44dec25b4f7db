"""Collection (metrics/collect.py): rates from two bulk reads of a hypervisor, as the reconcile's host_observed
signal hands them over, with the fake driver's counters."""

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from hypervisors.drivers.base import DomainCounters, DomainObserved, HostCountersRead, HostObserved, PowerState
from machines import services
from machines.states import Status
from metrics.collect import MIN_INTERVAL, collect, minute_of
from metrics.models import HostCounters, HostSample, MachineSample, Resolution
from tests.factories import HypervisorFactory, MachineFactory

pytestmark = pytest.mark.django_db

T0 = 1_800_000_000.0  # an epoch second on a minute boundary (2027-01-15 08:00 UTC)
GIB_NS = 10**9


def counters(cpu_s: float = 0.0, *, rd: int = 0, wr: int = 0, rx: int = 0, tx: int = 0, vcpus: int = 2, **kw):
    return DomainCounters(
        cpu_time_ns=int(cpu_s * 1e9),
        vcpus=vcpus,
        memory_current_kib=2 << 20,
        memory_rss_kib=kw.pop("rss", 512 << 10),
        disk_read_bytes=rd,
        disk_write_bytes=wr,
        disk_read_reqs=rd // 4096,
        disk_write_reqs=wr // 4096,
        net_rx_bytes=rx,
        net_tx_bytes=tx,
        **kw,
    )


def read(domains: dict, *, busy_s: float = 0.0, idle_s: float = 0.0) -> HostObserved:
    """A bulk read: uuid -> (run, counters) (run -1: off)."""
    return HostObserved(
        domains={
            u: DomainObserved(state=PowerState.RUNNING if run >= 0 else PowerState.OFF, run=run, counters=c)
            for u, (run, c) in domains.items()
        },
        leases={},
        counters=HostCountersRead(
            cpus=4,
            cpu_busy_ns=int(busy_s * 1e9),
            cpu_idle_ns=int(idle_s * 1e9),
            memory_total_kib=16 << 20,
            memory_free_kib=4 << 20,
            memory_buffers_kib=1 << 20,
            memory_cached_kib=3 << 20,
        ),
    )


@pytest.fixture
def hv():
    return HypervisorFactory(name="lab", cpus=4, memory_mib=16384)


def machine(hv, **kw):
    return MachineFactory(hypervisor=hv, status=Status.ACTIVE, vcpus=2, memory_mib=2048, disk_gib=10, **kw)


def point(m):
    return MachineSample.objects.get(machine=m, resolution=Resolution.MINUTE)


def test_the_first_read_is_a_baseline_only(hv):
    m = machine(hv)
    assert collect(hv.pk, read({str(m.uuid): (1, counters(5))}), read_at=T0, read_seconds=0.01) == 0
    assert not MachineSample.objects.exists() and not HostSample.objects.exists()
    baseline = HostCounters.objects.get(hypervisor=hv)
    assert baseline.read_at == T0 and baseline.domains[str(m.uuid)]["cpu_time_ns"] == 5 * 10**9
    assert baseline.domains[str(m.uuid)]["run"] == 1 and baseline.host["cpus"] == 4


def test_rates_are_the_counters_differences_over_the_wall_time_between_two_reads(hv):
    m = machine(hv)
    u = str(m.uuid)
    collect(hv.pk, read({u: (1, counters(10, rd=0, wr=0, rx=0, tx=0))}, busy_s=100, idle_s=300), read_at=T0 + 5)
    later = read({u: (1, counters(10 + 30, rd=6_000_000, wr=1_200_000, rx=600, tx=120))}, busy_s=160, idle_s=480)
    assert collect(hv.pk, later, read_at=T0 + 65, read_seconds=0.02) == 1
    p = point(m)
    assert p.at == datetime.fromtimestamp(T0, tz=UTC)  # the minute that holds the middle of [T0+5, T0+65]
    assert p.cpu_pct == pytest.approx(25.0)  # 30 s of CPU in 60 s over 2 vCPUs
    assert (p.disk_read_bps, p.disk_write_bps) == (pytest.approx(100_000), pytest.approx(20_000))
    assert p.disk_read_iops == pytest.approx(6_000_000 // 4096 / 60)
    assert (p.net_rx_bps, p.net_tx_bps) == (pytest.approx(10), pytest.approx(2))
    assert p.memory_used_mib == 512  # no guest balloon figures: QEMU's resident memory
    assert (p.seconds_running, p.vcpus, p.memory_mib, p.disk_gib) == (60, 2, 2048, 10)
    h = HostSample.objects.get(hypervisor=hv, resolution=Resolution.MINUTE)
    assert h.cpu_pct == pytest.approx(25.0)  # 60 s busy of 240 s
    assert (h.memory_total_mib, h.memory_used_mib) == (16384, 8192)  # less free, buffers and cache
    assert (h.vcpus_allocated, h.vcpus_capacity) == (2, 16)  # 4 CPUs times the default overcommit of 4
    assert (h.memory_allocated_mib, h.memory_capacity_mib, h.disk_allocated_gib) == (2048, 16384, 10)
    assert h.machines_running == 1
    baseline = HostCounters.objects.get(hypervisor=hv)
    assert baseline.read_at == T0 + 65 and baseline.read_seconds == 0.02


def test_the_guests_own_memory_figures_come_first(hv):
    m = machine(hv)
    u = str(m.uuid)
    collect(hv.pk, read({u: (1, counters(1))}), read_at=T0)
    told = counters(2, memory_available_kib=2 << 20, memory_unused_kib=1536 << 10)
    collect(hv.pk, read({u: (1, told)}), read_at=T0 + 60)
    assert point(m).memory_used_mib == 512


def test_a_restarted_domain_gets_no_rates_and_its_new_run_is_the_baseline(hv):
    m = machine(hv)
    u = str(m.uuid)
    collect(hv.pk, read({u: (1, counters(500))}), read_at=T0)
    collect(hv.pk, read({u: (2, counters(3))}), read_at=T0 + 60)  # a new run: its counters began again
    p = point(m)
    assert p.cpu_pct is None and p.disk_read_bps is None and p.net_rx_bps is None
    assert p.seconds_running == 30  # it ran part of the minute
    collect(hv.pk, read({u: (2, counters(9))}), read_at=T0 + 120)
    assert MachineSample.objects.get(machine=m, at=minute_of(T0 + 90)).cpu_pct == pytest.approx(5.0)


def test_counters_that_went_backwards_in_the_same_run_give_no_rates(hv):
    m = machine(hv)
    u = str(m.uuid)
    collect(hv.pk, read({u: (1, counters(100, rd=1000))}), read_at=T0)
    collect(hv.pk, read({u: (1, counters(101, rd=10))}), read_at=T0 + 60)
    p = point(m)
    assert p.cpu_pct is None and p.disk_read_bps is None and p.seconds_running == 60


def test_a_read_soon_after_the_baseline_writes_nothing_and_keeps_the_older_baseline(hv):
    m = machine(hv)
    u = str(m.uuid)
    collect(hv.pk, read({u: (1, counters(0))}), read_at=T0)
    assert collect(hv.pk, read({u: (1, counters(1))}), read_at=T0 + MIN_INTERVAL - 1) == 0  # an on-demand cycle
    assert not MachineSample.objects.exists()
    assert HostCounters.objects.get(hypervisor=hv).read_at == T0
    collect(hv.pk, read({u: (1, counters(12))}), read_at=T0 + 60)
    assert point(m).cpu_pct == pytest.approx(10.0)  # over the whole minute from the older baseline


def test_a_second_point_for_a_minute_is_skipped_and_the_first_stays(hv):
    m = machine(hv)
    u = str(m.uuid)
    collect(hv.pk, read({u: (1, counters(0))}), read_at=T0 + 10)
    collect(hv.pk, read({u: (1, counters(12))}), read_at=T0 + 40)  # middle T0+25
    collect(hv.pk, read({u: (1, counters(36))}), read_at=T0 + 75)  # middle T0+57.5: the same minute
    assert MachineSample.objects.filter(machine=m).count() == 1 and HostSample.objects.count() == 1
    assert point(m).cpu_pct == pytest.approx(20.0)
    assert HostCounters.objects.get(hypervisor=hv).read_at == T0 + 75  # the baseline moved on all the same


def test_an_old_baseline_is_replaced_without_a_point(hv):
    m = machine(hv)
    u = str(m.uuid)
    collect(hv.pk, read({u: (1, counters(0))}), read_at=T0)
    assert collect(hv.pk, read({u: (1, counters(50))}), read_at=T0 + 3600) == 0  # the reconcile was stopped
    assert not MachineSample.objects.exists()
    assert HostCounters.objects.get(hypervisor=hv).read_at == T0 + 3600


def test_stopped_and_missing_machines_get_their_allocation_without_rates(hv):
    off, gone, on = machine(hv), machine(hv), machine(hv)
    MachineFactory(hypervisor=hv, status=Status.NEW)  # nothing made yet: no point
    domains = {str(off.uuid): (-1, None), str(on.uuid): (3, counters(0))}
    collect(hv.pk, read(domains), read_at=T0)
    domains[str(on.uuid)] = (3, counters(6))
    collect(hv.pk, read(domains), read_at=T0 + 60)
    for m in (off, gone):
        p = point(m)
        assert p.seconds_running == 0 and p.cpu_pct is None and p.memory_used_mib is None
        assert (p.vcpus, p.memory_mib, p.disk_gib) == (2, 2048, 10)
    assert point(on).cpu_pct == pytest.approx(5.0)
    h = HostSample.objects.get()
    assert (h.machines_running, h.vcpus_allocated, h.disk_allocated_gib) == (1, 6, 30)


def test_a_domain_that_tells_no_counters_runs_without_rates(hv):
    """As on libvirt's test driver: state and run only."""
    m = machine(hv)
    collect(hv.pk, read({str(m.uuid): (1, None)}), read_at=T0)
    collect(hv.pk, read({str(m.uuid): (1, None)}), read_at=T0 + 60)
    p = point(m)
    assert p.seconds_running == 60 and p.cpu_pct is None and p.memory_used_mib is None


def _queries_of_a_cycle(hv, n: int) -> int:
    machines = [machine(hv) for _ in range(n)]
    first = {str(m.uuid): (1, counters(i)) for i, m in enumerate(machines)}
    collect(hv.pk, read(first), read_at=T0)
    second = {str(m.uuid): (1, counters(i + 6)) for i, m in enumerate(machines)}
    with CaptureQueriesContext(connection) as captured:
        assert collect(hv.pk, read(second), read_at=T0 + 60) == n
    return len(captured.captured_queries)


def test_the_queries_of_a_cycle_do_not_grow_with_the_machines():
    few = _queries_of_a_cycle(HypervisorFactory(name="few"), 2)
    many = _queries_of_a_cycle(HypervisorFactory(name="many"), 20)
    assert few == many <= 12, (few, many)


def test_the_reconcile_hands_each_hypervisors_read_to_the_collection(host, hv):
    """Through machines.services.observation.host_observed: the reconcile's own read, once per hypervisor."""
    m = machine(hv)
    u = str(m.uuid)
    host.domains[u] = {"state": PowerState.RUNNING, "run": 7, "vnc_config_protected": True, "macs": []}
    host.domains[u]["counters"] = counters(10)
    host.host_counters = HostCountersRead(cpus=4, cpu_busy_ns=10 * GIB_NS, cpu_idle_ns=30 * GIB_NS)
    services.hypervisor_reconcile_run(hv.pk)
    baseline = HostCounters.objects.get(hypervisor=hv)
    assert baseline.domains[u]["run"] == 7 and not MachineSample.objects.exists()
    HostCounters.objects.filter(pk=baseline.pk).update(read_at=baseline.read_at - 60)  # as if a minute ago
    host.domains[u]["counters"] = counters(16)
    host.host_counters = HostCountersRead(cpus=4, cpu_busy_ns=40 * GIB_NS, cpu_idle_ns=210 * GIB_NS)
    services.hypervisor_reconcile_run(hv.pk)
    p = point(m)
    assert p.seconds_running == 60 and p.cpu_pct == pytest.approx(5.0, rel=0.05)
    h = HostSample.objects.get(hypervisor=hv)
    assert h.cpu_pct == pytest.approx(100 * 30 / 210) and h.memory_total_mib is None  # it told no memory

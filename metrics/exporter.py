"""`GET /metrics`: the portal's figures in Prometheus' text format, for a Prometheus that scrapes it.

Everything comes from the database (what the reconcile and the collection stored), never from a hypervisor,
at a constant number of queries whatever the number of machines: per machine its latest one-minute point and
what it was given, per hypervisor its capacity, what is placed on it and its own CPU and memory, and the
portal's health (the queue, the worker's heartbeat, each hypervisor's last bulk read, provisioning times).

Read with `Authorization: Bearer <PORTAL_METRICS_TOKEN>`, from an address in PORTAL_METRICS_ALLOWED_NETWORKS,
or by a staff session; anyone else gets a plain-text 401 (no credentials) or 403."""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import OuterRef, Q, Subquery
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from hypervisors.models import Hypervisor, HypervisorStatus
from machines.access import HYPERVISOR_CAPABILITIES
from machines.capacity import held_by, usage_by
from machines.models import Machine, MachineEvent
from machines.states import PowerState, Status
from metrics.models import HostCounters, HostSample, MachineSample, Resolution
from portal import throttle
from portal.http_fetch import parse_networks
from portal.queue import queue_report

MIB = 1 << 20
GIB = 1 << 30
# A machine's or host's latest minute point older than this is not exported: the figures would be stale (its
# hypervisor unreachable, the collection stopped); the allocation series stay.
FRESH = timedelta(minutes=5)
# Provisioning times: of the machines created in this window, from the create to their first Active (or Error).
PROVISIONING_WINDOW = timedelta(days=7)
PROVISIONING_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600)
MACHINE_LABELS = ["machine", "uuid", "owner", "project", "hypervisor"]
MACHINE_COLUMNS = (
    *("name", "uuid", "status", "power_state", "vcpus", "memory_mib", "disk_gib", "extra_disks"),
    *("owner__username", "project__name", "hypervisor__name"),
)


def _gauge(name: str, doc: str, labels: list[str] | None = None, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels, unit=unit)


def _latest_minute(model, key: str):
    """A subquery: the id of the newest minute point of the outer row (machine or hypervisor)."""
    return Subquery(
        model.objects.filter(**{key: OuterRef("pk")}, resolution=Resolution.MINUTE).order_by("-at").values("pk")[:1]
    )


def machine_families() -> Iterator[Metric]:
    """Per machine: what it was given, and from its latest fresh minute point what it used (three queries)."""
    machines = list(
        Machine.objects.select_related("owner", "project", "hypervisor")
        .annotate(latest=_latest_minute(MachineSample, "machine"))
        .only(*MACHINE_COLUMNS)
        .order_by("pk")
    )
    fresh_after = timezone.now() - FRESH
    samples = MachineSample.objects.filter(at__gte=fresh_after).in_bulk([m.latest for m in machines if m.latest])
    info = _gauge(
        "portal_machine_info", "A machine, with its status and power state.", MACHINE_LABELS + ["status", "power_state"]
    )
    running = _gauge("portal_machine_running", "1 if the machine was last seen running, else 0.", MACHINE_LABELS)
    vcpus = _gauge("portal_machine_vcpus", "vCPUs the machine is given.", MACHINE_LABELS)
    memory = _gauge("portal_machine_memory_bytes", "Memory the machine is given.", MACHINE_LABELS)
    disk = _gauge("portal_machine_disk_bytes", "Disk the machine holds (main and extra disks).", MACHINE_LABELS)
    cpu = _gauge(
        "portal_machine_cpu_usage_ratio", "CPU time over wall time, of all its vCPUs (0 to 1).", MACHINE_LABELS
    )
    used = _gauge(
        "portal_machine_memory_used_bytes", "Memory the guest uses (balloon), where it tells.", MACHINE_LABELS
    )
    disk_bytes = _gauge("portal_machine_disk_bytes_per_second", "Disk throughput.", MACHINE_LABELS + ["op"])
    disk_ops = _gauge("portal_machine_disk_operations_per_second", "Disk operations.", MACHINE_LABELS + ["op"])
    net = _gauge("portal_machine_network_bytes_per_second", "Network throughput.", MACHINE_LABELS + ["direction"])
    at = _gauge("portal_machine_sample_timestamp_seconds", "Start of the minute the figures are of.", MACHINE_LABELS)
    for m in machines:
        project = m.project.name if m.project else ""
        labels = [m.name, str(m.uuid), m.owner.username, project, m.hypervisor.name]
        info.add_metric([*labels, m.status, m.power_state], 1)
        running.add_metric(labels, 1 if m.power_state == PowerState.RUNNING else 0)
        vcpus.add_metric(labels, m.vcpus)
        memory.add_metric(labels, m.memory_mib * MIB)
        disk.add_metric(labels, held_by(m)["disk_gib"] * GIB)
        s = samples.get(m.latest)
        if s is None:
            continue
        at.add_metric(labels, s.at.timestamp())
        _add(cpu, labels, s.cpu_pct, 0.01)
        _add(used, labels, s.memory_used_mib, MIB)
        for op, bps, iops in (
            ("read", s.disk_read_bps, s.disk_read_iops),
            ("write", s.disk_write_bps, s.disk_write_iops),
        ):
            _add(disk_bytes, [*labels, op], bps)
            _add(disk_ops, [*labels, op], iops)
        _add(net, [*labels, "rx"], s.net_rx_bps)
        _add(net, [*labels, "tx"], s.net_tx_bps)
    yield from (info, running, vcpus, memory, disk, cpu, used, disk_bytes, disk_ops, net, at)


def _add(family: GaugeMetricFamily, labels: list[str], value: float | None, scale: float = 1) -> None:
    """A point only where the figure was measured (None: not measured, which is not zero)."""
    if value is not None:
        family.add_metric(labels, value * scale)


def hypervisor_families() -> Iterator[Metric]:
    """Per hypervisor: capacity, what is placed on it (as placement counts it), its own CPU and memory from the
    latest fresh minute point, and its last bulk read (six queries)."""
    hosts = list(
        Hypervisor.objects.defer(*HYPERVISOR_CAPABILITIES)
        .annotate(latest=_latest_minute(HostSample, "hypervisor"))
        .order_by("name")
    )
    placed = usage_by(Machine.objects.all(), "hypervisor")
    samples = HostSample.objects.filter(at__gte=timezone.now() - FRESH).in_bulk([h.latest for h in hosts if h.latest])
    counters = {c.hypervisor_id: c for c in HostCounters.objects.only("hypervisor_id", "read_at", "read_seconds")}
    labels = ["hypervisor"]
    up = _gauge("portal_hypervisor_up", "1 if the portal last reached the hypervisor (online), else 0.", labels)
    info = _gauge("portal_hypervisor_info", "A hypervisor, with its status.", labels + ["status"])
    vcpu_cap = _gauge("portal_hypervisor_vcpus_capacity", "Its CPUs times its vCPU overcommit.", labels)
    vcpu_alloc = _gauge("portal_hypervisor_vcpus_allocated", "vCPUs of the machines placed on it.", labels)
    mem_cap = _gauge("portal_hypervisor_memory_capacity_bytes", "Its memory.", labels)
    mem_alloc = _gauge("portal_hypervisor_memory_allocated_bytes", "Memory of the machines placed on it.", labels)
    disk_alloc = _gauge("portal_hypervisor_disk_allocated_bytes", "Disk held by the machines placed on it.", labels)
    machines = _gauge("portal_hypervisor_machines", "Machines placed on it.", labels)
    running = _gauge("portal_hypervisor_machines_running", "Machines running on it (latest minute).", labels)
    cpu = _gauge("portal_hypervisor_cpu_usage_ratio", "Host CPU busy, of all its CPUs (0 to 1).", labels)
    mem_used = _gauge("portal_hypervisor_memory_used_bytes", "Host memory in use.", labels)
    mem_total = _gauge("portal_hypervisor_memory_total_bytes", "Host memory, as the host reports it.", labels)
    read = _gauge("portal_reconcile_read_seconds", "How long the hypervisor's last bulk read took.", labels)
    age = _gauge("portal_reconcile_last_read_age_seconds", "Seconds since the hypervisor's last bulk read.", labels)
    now = time.time()
    for h in hosts:
        name = [h.name]
        taken = placed.get(h.pk, {})
        up.add_metric(name, 1 if h.status == HypervisorStatus.ONLINE else 0)
        info.add_metric([h.name, h.status], 1)
        vcpu_cap.add_metric(name, int((h.cpus or 0) * Decimal(h.cpu_allocation_ratio)))
        vcpu_alloc.add_metric(name, taken.get("vcpus", 0))
        mem_cap.add_metric(name, (h.memory_mib or 0) * MIB)
        mem_alloc.add_metric(name, taken.get("memory_mib", 0) * MIB)
        disk_alloc.add_metric(name, taken.get("disk_gib", 0) * GIB)
        machines.add_metric(name, taken.get("machines", 0))
        if (s := samples.get(h.latest)) is not None:
            running.add_metric(name, s.machines_running)
            _add(cpu, name, s.cpu_pct, 0.01)
            _add(mem_used, name, s.memory_used_mib, MIB)
            _add(mem_total, name, s.memory_total_mib, MIB)
        if (c := counters.get(h.pk)) is not None:
            read.add_metric(name, c.read_seconds)
            age.add_metric(name, max(now - c.read_at, 0.0))
    yield from (up, info, vcpu_cap, vcpu_alloc, mem_cap, mem_alloc, disk_alloc, machines, running, cpu)
    yield from (mem_used, mem_total, read, age)


def health_families() -> Iterator[Metric]:
    """The queue and the worker, as the dashboard and /healthz read them (one query and the queue's count)."""
    queue = queue_report()
    readable = _gauge("portal_queue_readable", "1 if the task queue could be read, else 0.")
    readable.add_metric([], 0 if queue.error or queue.waiting is None else 1)
    yield readable
    if queue.waiting is not None:
        waiting = _gauge("portal_queue_waiting_tasks", "Tasks waiting for the worker.")
        waiting.add_metric([], queue.waiting)
        yield waiting
    worker = _gauge("portal_worker_up", "1 if the worker's heartbeat is recent (PORTAL_WORKER_STALE_AFTER).")
    worker.add_metric([], 1 if queue.worker_ok else 0)
    yield worker
    if queue.worker_seen is not None:
        age = _gauge("portal_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.")
        age.add_metric([], max(queue.worker_age, 0.0))
        yield age


def provisioning_family() -> Metric:
    """Seconds from a machine's create to its first Active (outcome="active") or, if it failed first, its first
    Error (outcome="error"), over the machines created in the last PROVISIONING_WINDOW that got there and still
    exist; adopted machines (a domain taken over, nothing built) are left out. One query."""
    status = MachineEvent.objects.filter(machine=OuterRef("pk"), step="status")
    first = {
        outcome: Subquery(status.filter(message__startswith=label).order_by("created").values("created")[:1])
        for outcome, label in (("active", Status.ACTIVE.label), ("error", Status.ERROR.label))
    }
    rows = (
        Machine.objects.filter(created__gte=timezone.now() - PROVISIONING_WINDOW, adopted=False)
        .annotate(active=first["active"], error=first["error"])
        .filter(Q(active__isnull=False) | Q(error__isnull=False))
        .values_list("created", "active", "error")
    )
    seconds: dict[str, list[float]] = {"active": [], "error": []}
    for created, active, error in rows:
        outcome, end = ("active", active) if active and (not error or active <= error) else ("error", error)
        seconds[outcome].append(max((end - created).total_seconds(), 0.0))
    family = HistogramMetricFamily(
        "portal_machine_provisioning_seconds",
        f"From a machine's create to its first Active or Error, of those created in the last "
        f"{PROVISIONING_WINDOW.days} days.",
        labels=["outcome"],
    )
    for outcome, values in seconds.items():
        buckets = [(floatToGoString(b), sum(1 for v in values if v <= b)) for b in PROVISIONING_BUCKETS]
        family.add_metric([outcome], [*buckets, ("+Inf", len(values))], sum_value=sum(values))
    return family


class PortalCollector(Collector):
    """Collected afresh on every scrape, from the database."""

    def collect(self) -> Iterator[Metric]:
        yield from machine_families()
        yield from hypervisor_families()
        yield from health_families()
        yield provisioning_family()


# Private: the process's default registry (Python's GC and process figures) stays out, and nothing registered
# elsewhere leaks in. auto_describe=False: registering does not collect (which would query at import).
REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(PortalCollector())


def _address_allowed(address: str | None) -> bool:
    if not address or not settings.PORTAL_METRICS_ALLOWED_NETWORKS:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # an IPv4 client on a dual-stack socket
    return any(
        ip.version == net.version and ip in net for net in parse_networks(settings.PORTAL_METRICS_ALLOWED_NETWORKS)
    )


def _refusal(status: int, text: str) -> HttpResponse:
    response = HttpResponse(text + "\n", status=status, content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


def refused(request: HttpRequest) -> HttpResponse | None:
    """None if the caller may read /metrics, else the plain-text answer. A bearer token, when one is sent, must be
    PORTAL_METRICS_TOKEN; without one the address allow-list, then a staff session, decide."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() == "bearer":
        # Guessed tokens lock the address as guessed API tokens do (portal/throttle.py): checked before the token.
        address = request.META.get("REMOTE_ADDR")
        lock = throttle.lock_for(address=address)
        if lock is not None:
            response = _refusal(429, lock.message())
            response["Retry-After"] = str(lock.seconds)
            return response
        expected = settings.PORTAL_METRICS_TOKEN
        if expected and hmac.compare_digest(credential.strip().encode(), expected.encode()):
            return None
        throttle.failure_record(address=address, kind="token")
        return _refusal(401, "Invalid metrics token.")
    if _address_allowed(request.META.get("REMOTE_ADDR")):
        return None
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return (
            None
            if user.is_active and user.is_staff
            else _refusal(403, "Only staff, the metrics token or an allowed address may read metrics.")
        )
    return _refusal(401, "Authentication required: Authorization: Bearer <metrics token>.")


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if (refusal := refused(request)) is not None:
        return refusal
    # The format the scraper asks for (Prometheus' Accept: OpenMetrics or text 1.0.0; none: text 0.0.4), as
    # prometheus_client's own WSGI app negotiates it.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = HttpResponse(encode(REGISTRY), content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response

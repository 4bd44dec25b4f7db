"""GET /metrics (metrics/exporter.py): Prometheus' text format as its own parser reads it, the families and labels
a scrape config relies on, who may read it (token, address allow-list, staff session) and who may not, label
values escaped, and a constant number of queries however many machines there are."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from machines.models import MachineEvent
from machines.states import PowerState, Status
from metrics import exporter
from metrics.models import HostCounters, HostSample, MachineSample, Resolution
from portal.models import AuditEvent, Heartbeat
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db
TOKEN = "s3cret-metrics-token"


@pytest.fixture(autouse=True)
def metrics_settings(settings):
    settings.PORTAL_METRICS_TOKEN = TOKEN
    settings.PORTAL_METRICS_ALLOWED_NETWORKS = []


def _minute(ago: int = 1):
    now = timezone.now().replace(second=0, microsecond=0)
    return now - timedelta(minutes=ago)


def _world(n: int = 2):
    """n machines on one hypervisor, each with a fresh minute point and an old one; the host's point and counters."""
    hv = HypervisorFactory(name="kvm-1", cpus=4, memory_mib=8192)
    project = ProjectFactory(name="team")
    owner = UserFactory(username="alice")
    machines = []
    for i in range(n):
        m = MachineFactory(
            name=f"web{i}", owner=owner, project=project if i % 2 == 0 else None, hypervisor=hv,
            vcpus=2, memory_mib=1024, disk_gib=10, status=Status.ACTIVE, power_state=PowerState.RUNNING,
        )  # fmt: skip
        MachineSample.objects.create(machine=m, resolution=Resolution.MINUTE, at=_minute(3), cpu_pct=90.0)
        MachineSample.objects.create(
            machine=m, resolution=Resolution.MINUTE, at=_minute(1), cpu_pct=50.0, memory_used_mib=512,
            disk_read_bps=1000, disk_write_bps=2000, disk_read_iops=3, disk_write_iops=4, net_rx_bps=10,
            net_tx_bps=None, vcpus=2, memory_mib=1024, disk_gib=10,
        )  # fmt: skip
        machines.append(m)
    HostSample.objects.create(
        hypervisor=hv, resolution=Resolution.MINUTE, at=_minute(1), cpu_pct=25.0, memory_used_mib=4096,
        memory_total_mib=8192, machines_running=n,
    )  # fmt: skip
    HostCounters.objects.create(hypervisor=hv, read_at=timezone.now().timestamp() - 30, read_seconds=0.25)
    return hv, machines


def _scrape(client, **headers):
    return client.get("/metrics", headers=headers)


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families, name, **labels):
    family = families.get(name) or families[name.rsplit("_", 1)[0]]  # a histogram's _bucket, _count, _sum
    for s in family.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no {name} with {labels}: {family.samples}")


def test_it_answers_the_prometheus_text_format_with_the_families_and_labels(client):
    hv, machines = _world(2)
    Heartbeat.objects.create(name="worker", seen=timezone.now() - timedelta(seconds=12))
    r = _scrape(client, authorization=f"Bearer {TOKEN}")
    assert r.status_code == 200
    assert r["Content-Type"].startswith("text/plain; version=")
    families = _families(r.content.decode())
    web0 = {
        "machine": "web0",
        "uuid": str(machines[0].uuid),
        "owner": "alice",
        "project": "team",
        "hypervisor": "kvm-1",
    }
    assert _value(families, "portal_machine_cpu_usage_ratio", **web0) == pytest.approx(0.5)  # the newest point
    assert _value(families, "portal_machine_vcpus", **web0) == 2
    assert _value(families, "portal_machine_memory_bytes", **web0) == 1024 << 20
    assert _value(families, "portal_machine_memory_used_bytes", **web0) == 512 << 20
    assert _value(families, "portal_machine_disk_bytes", **web0) == 10 << 30
    assert _value(families, "portal_machine_disk_bytes_per_second", op="write", **web0) == 2000
    assert _value(families, "portal_machine_disk_operations_per_second", op="read", **web0) == 3
    assert _value(families, "portal_machine_network_bytes_per_second", direction="rx", **web0) == 10
    tx = [s for s in families["portal_machine_network_bytes_per_second"].samples if s.labels["direction"] == "tx"]
    assert tx == []  # not measured is no point, not a zero
    assert _value(families, "portal_machine_running", machine="web1", project="") == 1  # no project: empty label
    assert _value(families, "portal_machine_info", machine="web0", status="active", power_state="running") == 1
    assert _value(families, "portal_hypervisor_vcpus_capacity", hypervisor="kvm-1") > 0
    assert _value(families, "portal_hypervisor_vcpus_allocated", hypervisor="kvm-1") == 4
    assert _value(families, "portal_hypervisor_memory_allocated_bytes", hypervisor="kvm-1") == 2048 << 20
    assert _value(families, "portal_hypervisor_memory_capacity_bytes", hypervisor="kvm-1") == 8192 << 20
    assert _value(families, "portal_hypervisor_cpu_usage_ratio", hypervisor="kvm-1") == pytest.approx(0.25)
    assert _value(families, "portal_hypervisor_up", hypervisor="kvm-1") == 1
    assert _value(families, "portal_reconcile_read_seconds", hypervisor="kvm-1") == 0.25
    assert 29 <= _value(families, "portal_reconcile_last_read_age_seconds", hypervisor="kvm-1") < 600
    assert _value(families, "portal_queue_readable") == 1
    assert _value(families, "portal_queue_waiting_tasks") >= 0
    assert 12 <= _value(families, "portal_worker_heartbeat_age_seconds") < 600
    assert families["portal_machine_provisioning_seconds"].type == "histogram"


def test_a_stale_point_gives_no_usage_but_the_allocation_stays(client):
    hv, (m,) = _world(1)
    MachineSample.objects.filter(machine=m).delete()
    MachineSample.objects.create(machine=m, resolution=Resolution.MINUTE, at=_minute(60), cpu_pct=50.0)
    families = _families(_scrape(client, authorization=f"Bearer {TOKEN}").content.decode())
    assert [s for s in families["portal_machine_cpu_usage_ratio"].samples] == []
    assert _value(families, "portal_machine_vcpus", machine="web0") == 2


def test_provisioning_durations_are_a_histogram_by_outcome(client):
    hv = HypervisorFactory(name="kvm-p")
    now = timezone.now()
    for name, seconds, outcome in (("a", 8, "Active"), ("b", 45, "Active"), ("c", 400, "Error: no room")):
        m = MachineFactory(name=name, hypervisor=hv)
        ev = MachineEvent.objects.create(machine=m, step="status", message=outcome)
        MachineEvent.objects.filter(pk=ev.pk).update(created=m.created + timedelta(seconds=seconds))
    old = MachineFactory(name="old", hypervisor=hv)  # created before the window: left out
    type(old).objects.filter(pk=old.pk).update(created=now - timedelta(days=30))
    MachineEvent.objects.create(machine=old, step="status", message="Active")
    MachineFactory(name="still", hypervisor=hv)  # still provisioning: no outcome yet
    families = _families(_scrape(client, authorization=f"Bearer {TOKEN}").content.decode())
    h = "portal_machine_provisioning_seconds"
    assert _value(families, f"{h}_count", outcome="active") == 2
    assert _value(families, f"{h}_bucket", outcome="active", le="10.0") == 1
    assert _value(families, f"{h}_bucket", outcome="active", le="60.0") == 2
    assert _value(families, f"{h}_sum", outcome="active") == pytest.approx(53, abs=1)
    assert _value(families, f"{h}_count", outcome="error") == 1
    assert _value(families, f"{h}_bucket", outcome="error", le="300.0") == 0


def test_label_values_are_escaped(client):
    """Project and user names are free text: quotes, backslashes and newlines come back as they were."""
    hv = HypervisorFactory(name="kvm-x")
    odd_user = UserFactory(username='ev"il\\u')
    odd_project = ProjectFactory(name='a "b"\nc\\d')
    MachineFactory(name="odd", owner=odd_user, project=odd_project, hypervisor=hv)
    text = _scrape(client, authorization=f"Bearer {TOKEN}").content.decode()
    assert '\nc\\d"' not in text  # the newline is escaped, not a line break in the output
    families = _families(text)
    assert _value(families, "portal_machine_vcpus", machine="odd", owner='ev"il\\u', project='a "b"\nc\\d') == 1


def test_anonymous_is_refused_with_401_and_a_challenge(client):
    r = _scrape(client)
    assert r.status_code == 401
    assert r["WWW-Authenticate"].startswith("Bearer")
    assert r["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", "Bearer ", "Bearer \u00e9t\u00e9", f"Bearer {TOKEN[:-1]}"])
def test_a_wrong_token_is_refused(client, header):
    r = _scrape(client, authorization=header)
    assert r.status_code == 401


def test_no_token_configured_accepts_no_token(client, settings):
    settings.PORTAL_METRICS_TOKEN = ""
    assert _scrape(client, authorization="Bearer ").status_code == 401
    assert _scrape(client, authorization="Bearer x").status_code == 401


def test_a_plain_user_session_is_refused_and_staff_is_not(client):
    client.force_login(UserFactory(username="plain"))
    assert _scrape(client).status_code == 403
    client.force_login(UserFactory(username="boss", is_staff=True))
    assert _scrape(client).status_code == 200


def test_post_is_not_allowed(client):
    assert client.post("/metrics", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 405


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "192.0.2.1", False),
        (["10.0.0.0/8", "2001:db8::/32"], "2001:db8::5", True),
        (["127.0.0.1"], "::ffff:127.0.0.1", True),  # an IPv4 client on a dual-stack socket
        ([], "127.0.0.1", False),  # empty: nobody by address
        (["10.0.0.0/8"], "not-an-address", False),
    ],
)
def test_the_address_allow_list(settings, networks, address, allowed):
    settings.PORTAL_METRICS_ALLOWED_NETWORKS = networks
    request = RequestFactory().get("/metrics", REMOTE_ADDR=address)
    from django.contrib.auth.models import AnonymousUser

    request.user = AnonymousUser()
    response = exporter.metrics(request)
    assert response.status_code == (200 if allowed else 401)


def test_x_forwarded_for_is_not_trusted(client, settings):
    settings.PORTAL_METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]
    assert _scrape(client, x_forwarded_for="10.1.2.3").status_code == 401  # REMOTE_ADDR is 127.0.0.1


def _count_queries(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert _scrape(client, authorization=f"Bearer {TOKEN}").status_code == 200
    return len(queries)


def test_queries_are_as_many_for_20_machines_as_for_2(client):
    _world(2)
    few = _count_queries(client)
    hv2 = HypervisorFactory(name="kvm-2")
    HostCounters.objects.create(hypervisor=hv2, read_at=timezone.now().timestamp(), read_seconds=1.0)
    for i in range(18):
        m = MachineFactory(name=f"db{i}", hypervisor=hv2, project=ProjectFactory(), extra_disks=[{"size_gib": 2}])
        MachineSample.objects.create(machine=m, resolution=Resolution.MINUTE, at=_minute(1), cpu_pct=1.0)
        MachineEvent.objects.create(machine=m, step="status", message="Active")
    many = _count_queries(client)
    assert many == few, f"{few} queries for 2 machines, {many} for 20"
    assert few <= 12


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", "text/plain; version=0.0.4"),
        ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5", "application/openmetrics-text"),
    ],
)
def test_the_format_is_the_one_asked_for(client, accept, content_type):
    _world(1)
    r = _scrape(client, authorization=f"Bearer {TOKEN}", accept=accept)
    assert r.status_code == 200 and r["Content-Type"].startswith(content_type)
    if content_type.startswith("application/openmetrics"):
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

        names = {f.name for f in openmetrics_families(r.content.decode())}
        assert {"portal_machine_vcpus", "portal_machine_provisioning_seconds"} <= names


def _from(client, address: str, token: str):
    return client.get("/metrics", headers={"authorization": f"Bearer {token}"}, REMOTE_ADDR=address)


def test_guessed_tokens_lock_the_address_out_as_guessed_api_tokens_do(client, settings):
    """Wrong bearer tokens count as failed token log-ins of the address (portal/throttle.py): once locked, even
    the right token from there answers 429 (nothing more is learnt), while another address still scrapes."""
    settings.PORTAL_LOGIN_MAX_FAILURES_PER_ADDRESS = 10
    for i in range(12):
        assert _from(client, "10.0.0.7", f"guess-{i}").status_code in (401, 429)
    r = _from(client, "10.0.0.7", TOKEN)
    assert r.status_code == 429 and int(r["Retry-After"]) > 60 and "Too many failed attempts" in r.content.decode()
    assert _from(client, "10.0.0.8", TOKEN).status_code == 200
    assert AuditEvent.objects.filter(action="login.lockout").exists()

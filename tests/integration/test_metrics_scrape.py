"""A scrape as Prometheus makes it: the portal under gunicorn (the `web_server` fixture, with the stack's
PORTAL_METRICS_TOKEN), read over HTTP with a raw client (urllib) and the bearer token, parsed by the Prometheus
client's parser; without the token, or with a wrong one, refused."""

import urllib.error
import urllib.request

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from machines.states import PowerState, Status
from metrics.models import HostCounters, MachineSample, Resolution
from tests.conftest import METRICS_TOKEN
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.integration


def _get(url: str, token: str | None = None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def test_prometheus_scrapes_the_running_portal(web_server, transactional_db):
    hv = HypervisorFactory(name="scrape-hv", cpus=4, memory_mib=4096)
    owner, project = UserFactory(username="scraper"), ProjectFactory(name="scrape-team")
    m = MachineFactory(
        name="scraped", owner=owner, project=project, hypervisor=hv, vcpus=2, status=Status.ACTIVE,
        power_state=PowerState.RUNNING,
    )  # fmt: skip
    minute = timezone.now().replace(second=0, microsecond=0)
    MachineSample.objects.create(machine=m, resolution=Resolution.MINUTE, at=minute, cpu_pct=42.0)
    HostCounters.objects.create(hypervisor=hv, read_at=timezone.now().timestamp(), read_seconds=0.5)

    status, headers, body = _get(f"{web_server}/metrics", METRICS_TOKEN)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    cpu = [s for s in families["portal_machine_cpu_usage_ratio"].samples if s.labels["machine"] == "scraped"]
    assert [(s.labels["owner"], s.labels["project"], s.labels["hypervisor"], s.value) for s in cpu] == [
        ("scraper", "scrape-team", "scrape-hv", pytest.approx(0.42))
    ]
    read = [s.value for s in families["portal_reconcile_read_seconds"].samples if s.labels["hypervisor"] == "scrape-hv"]
    assert read == [0.5]
    assert {"portal_worker_up", "portal_queue_readable", "portal_machine_provisioning_seconds"} <= set(families)

    status, headers, body = _get(f"{web_server}/metrics")
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="metrics"')
    assert "portal_machine" not in body
    assert _get(f"{web_server}/metrics", METRICS_TOKEN + "x")[0] == 401

"""The API and the admin drive the same background checks against the real libvirtd."""

import pytest
from django.test import Client
from rest_framework.test import APIClient

from hypervisors import services
from hypervisors.models import Hypervisor, HypervisorStatus
from portal.models import ApiToken
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


@pytest.fixture
def api(worker):
    staff = UserFactory(username="api-staff", is_staff=True, is_superuser=True)
    _, raw = ApiToken.issue(user=staff)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return client


def test_api_registers_syncs_and_reports(api, libvirtd):
    r = api.post("/api/v1/hypervisors/", {"name": "local", "uri": libvirtd}, format="json")
    assert r.status_code == 201, r.content
    url = f"/api/v1/hypervisors/{r.json()['id']}/"
    body = wait_for(lambda: (b := api.get(url).json())["status"] != "pending" and b, 30)
    assert body["status"] == "online", body["status_error"]
    assert body["arch"] and body["qemu_version"] and any(p["name"] == "default" for p in body["pools"])
    first_check = body["last_checked"]

    r = api.post(f"{url}sync/")
    assert r.status_code == 202
    wait_for(lambda: (b := api.get(url).json())["status"] == "online" and b["last_checked"] > first_check, 30)


def test_api_reports_an_unreachable_uri_as_down(api):
    r = api.post("/api/v1/hypervisors/", {"name": "nowhere", "uri": "qemu+tcp://127.0.0.1:1/system"}, format="json")
    url = f"/api/v1/hypervisors/{r.json()['id']}/"
    body = wait_for(lambda: (b := api.get(url).json())["status"] != "pending" and b, 30)
    assert body["status"] == "down" and "Connection refused" in body["status_error"]


def test_admin_sync_action_rechecks(worker, libvirtd):
    staff = UserFactory(username="admin-staff", is_staff=True, is_superuser=True)
    hv = services.hypervisor_create(name="local", uri=libvirtd)
    hv = wait_for(lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status == HypervisorStatus.ONLINE and h, 30)
    client = Client()
    client.force_login(staff)
    r = client.post("/admin/hypervisors/hypervisor/", {"action": "sync_now", "_selected_action": [hv.pk]})
    assert r.status_code == 302
    wait_for(lambda: Hypervisor.objects.get(pk=hv.pk).last_checked > hv.last_checked, 30)
    assert Hypervisor.objects.get(pk=hv.pk).status == HypervisorStatus.ONLINE

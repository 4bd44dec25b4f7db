"""A machine moved from its page, and a hypervisor drained and evacuated from its page, in Chromium against the
real stack: gunicorn, the Huey consumer, the host's libvirtd and a private one in its own namespaces."""

import pytest
from playwright.sync_api import expect

from hypervisors import services as hv_services
from hypervisors.drivers import connections
from hypervisors.models import Hypervisor, HypervisorStatus
from machines import services
from machines.models import Machine
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS, wait_for
from tests.factories import UserFactory
from tests.private_libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.browser


@pytest.fixture
def other_host():
    with PrivateLibvirtd.start(name="bmove", log_dir=ARTIFACTS) as lv:
        lv.define_xml(
            "pool", f"<pool type='dir'><name>default</name><target><path>{lv.workdir / 'pool'}</path></target></pool>"
        )
        try:
            yield lv
        finally:
            connections.drop_connection(lv.uri)


def test_staff_move_a_machine_then_drain_and_evacuate_a_host(page, other_host, web_server, worker, local):
    staff = UserFactory(username="mover", password="correct-horse-battery", is_staff=True, is_superuser=True)
    other = hv_services.hypervisor_create(name="other", uri=other_host.uri)
    wait_for(lambda: Hypervisor.objects.get(pk=other.pk).status == HypervisorStatus.ONLINE, 60)
    machine = services.machine_create(
        owner=staff, hypervisor=local, name="metal9", deploy_type="network", nics=[services.NicInput(type="user")]
    )
    wait_for(lambda: Machine.objects.get(pk=machine.pk).status == "active", 60)
    login(page, web_server, "mover", "correct-horse-battery")

    # The machine's page: Move, to the host chosen.
    page.goto(f"{web_server}/machines/{machine.pk}/")
    page.select_option("#migrate-to", label="other")
    page.screenshot(path=str(ARTIFACTS / "browser-move-form.png"), full_page=True)
    page.get_by_role("button", name="Move").click()
    expect(page.locator(".alert-info")).to_contain_text("Moving metal9 to other")
    wait_for(lambda: Machine.objects.get(pk=machine.pk).hypervisor_id == other.pk, 60)
    page.reload()
    expect(page.locator("body")).to_contain_text("now on other")
    page.screenshot(path=str(ARTIFACTS / "browser-moved.png"), full_page=True)

    # The host's page: drained (a badge says so), then evacuated back to local.
    page.goto(f"{web_server}/hypervisors/{other.pk}/")
    page.locator("#btn-drain").click()
    expect(page.locator("#hv-maintenance")).to_contain_text("in maintenance")
    expect(page.locator("#btn-drain")).to_contain_text("Return to service")
    page.locator("#btn-evacuate").click()
    expect(page.locator(".alert-info")).to_contain_text("Evacuating other: metal9: to local")
    wait_for(lambda: Machine.objects.get(pk=machine.pk).hypervisor_id == local.pk, 60)
    page.screenshot(path=str(ARTIFACTS / "browser-evacuated.png"), full_page=True)
    page.locator("#btn-drain").click()
    expect(page.locator("#btn-drain")).to_contain_text("Drain")

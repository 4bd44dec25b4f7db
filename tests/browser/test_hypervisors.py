"""Log in, add a hypervisor, watch it come online: gunicorn, the Huey consumer and libvirtd for real."""

import pytest
from playwright.sync_api import expect

from hypervisors.models import Hypervisor
from tests.conftest import ARTIFACTS
from tests.factories import UserFactory

pytestmark = pytest.mark.browser


def login(page, base_url: str, username: str, password: str) -> None:
    page.goto(f"{base_url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def test_staff_adds_a_hypervisor_and_watches_it_come_online(page, web_server, worker, libvirtd):
    UserFactory(username="ops", password="correct-horse-battery", is_staff=True, is_superuser=True)
    login(page, web_server, "ops", "correct-horse-battery")

    page.locator("#nav").get_by_role("link", name="Hypervisors").click()
    page.get_by_role("link", name="Add hypervisor").click()
    page.fill("#id_name", "lab")
    page.fill("#id_uri", "qemu+tls:///system")
    page.get_by_role("button", name="Add hypervisor").click()
    expect(page.locator(".invalid-feedback")).to_contain_text("needs a host")
    page.screenshot(path=str(ARTIFACTS / "browser-hypervisor-bad-uri.png"), full_page=True)
    assert not Hypervisor.objects.exists()

    page.fill("#id_uri", libvirtd)
    page.get_by_role("button", name="Add hypervisor").click()
    expect(page.get_by_role("heading", name="lab")).to_be_visible()
    # The detail page polls its facts with htmx until the worker's check lands.
    expect(page.locator("#hv-status")).to_contain_text("Online", timeout=30_000)
    expect(page.locator("#hv-arch")).to_contain_text("x86_64")
    expect(page.locator("#hv-pools")).to_contain_text("default")
    page.screenshot(path=str(ARTIFACTS / "browser-hypervisor-online.png"), full_page=True)

    page.locator("#nav").get_by_role("link", name="Hypervisors").click()
    expect(page.locator("#hypervisor-table")).to_contain_text("Online")
    page.screenshot(path=str(ARTIFACTS / "browser-hypervisor-list.png"), full_page=True)

    # The dashboard says the worker runs, once its heartbeat lands (every second in the tests).
    from portal.models import Heartbeat
    from tests.conftest import wait_for

    wait_for(lambda: Heartbeat.objects.filter(name="worker").exists(), 15)
    page.locator("#nav").get_by_role("link", name="Dashboard").click()
    expect(page.locator("#worker-state")).to_contain_text("worker running")
    expect(page.locator("#dashboard-hypervisors")).to_contain_text("lab")
    page.screenshot(path=str(ARTIFACTS / "browser-dashboard.png"), full_page=True)

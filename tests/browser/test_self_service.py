"""A new user's day: log in, add an SSH key, create a machine within quota, open its console, and not
see another user's machine; staff see both. gunicorn, the worker, the console proxy and libvirtd for real."""

import pytest
from playwright.sync_api import expect

from machines import services
from machines.models import Machine, Quota
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.browser

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD newbie@laptop"


def test_new_user_self_service(browser, page, web_server, console_proxy, local, tiny_iso):
    UserFactory(username="newbie", password="correct-horse-battery")
    stranger = UserFactory(username="stranger")
    Quota.objects.create(user=stranger, machines=5)
    theirs = services.machine_create(
        owner=stranger,
        hypervisor=local,
        name="secret-box",
        deploy_type="iso",
        image=tiny_iso,
        memory_mib=256,
        disk_gib=1,
    )

    login(page, web_server, "newbie", "correct-horse-battery")
    expect(page.locator("#quota-usage")).to_contain_text("0 / 10")
    page.locator("#nav-account").click()
    page.fill("#id_name", "laptop")
    page.fill("#id_public_key", KEY)
    page.get_by_role("button", name="Add key").click()
    expect(page.locator("#ssh-keys")).to_contain_text("laptop")

    page.locator("#nav").get_by_role("link", name="Machines").click()
    expect(page.locator("#machine-table")).not_to_contain_text("secret-box")
    page.get_by_role("link", name="New machine").click()
    expect(page.locator("#id_ssh_authorized_keys")).to_have_value(KEY)  # offered from the profile
    page.check("#id_deploy_type_1")  # installer ISO
    page.fill("#id_name", "mine")
    page.select_option("#id_image", label="tiny-installer (ISO)")
    page.fill("#id_ssh_authorized_keys", "")
    page.fill("#id_memory_mib", "256")
    page.fill("#id_disk_gib", "1")
    page.select_option("#id_nic", "")
    page.get_by_role("button", name="Create machine").click()
    page.screenshot(path=str(ARTIFACTS / "browser-self-service-created.png"), full_page=True)
    expect(page.locator("#machine-status")).to_contain_text("Active", timeout=60_000)
    expect(page.locator("#machine-events")).to_contain_text("placed on local")  # "any hypervisor"

    page.locator("#btn-console").click()
    page.wait_for_function("() => window.portalConsole && window.portalConsole.state === 'connected'", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-self-service-console.png"))

    # Another user's machine does not exist for this user.
    page.goto(f"{web_server}/machines/{theirs.pk}/")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "browser-self-service-404.png"))

    staff_page = browser.new_context().new_page()
    UserFactory(username="chief", password="correct-horse-battery", is_staff=True, is_superuser=True)
    login(staff_page, web_server, "chief", "correct-horse-battery")
    staff_page.goto(f"{web_server}/machines/")
    expect(staff_page.locator("#machine-table")).to_contain_text("secret-box")
    expect(staff_page.locator("#machine-table")).to_contain_text("mine")
    staff_page.screenshot(path=str(ARTIFACTS / "browser-self-service-staff.png"), full_page=True)
    wait_for(lambda: Machine.objects.filter(status="active").count() == 2, 60)

"""Create an image machine through the form and watch its steps: gunicorn, the worker, libvirtd and QEMU for real."""

import pytest
from playwright.sync_api import expect

from machines.models import Machine
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.browser

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD tester@portal"


def test_user_creates_an_image_machine_and_watches_it_boot(page, web_server, local, tiny_image):
    UserFactory(username="dev", password="correct-horse-battery")
    login(page, web_server, "dev", "correct-horse-battery")
    page.locator("#nav").get_by_role("link", name="Machines").click()
    page.get_by_role("link", name="New machine").click()

    page.fill("#id_name", "Bad Name")
    page.select_option("#id_image", label="tiny (disk image)")
    page.fill("#id_memory_mib", "256")
    page.fill("#id_disk_gib", "1")
    page.fill("#id_ssh_authorized_keys", KEY)
    page.fill("#id_script", "#!/bin/sh\necho browser-made")
    page.get_by_role("button", name="Create machine").click()
    expect(page.locator(".invalid-feedback").first).to_contain_text("RFC 1123")
    assert not Machine.objects.exists()

    page.fill("#id_name", "browser1")
    # Picking the hypervisor redraws the form with its choices; what was typed stays.
    page.select_option("#id_hypervisor", label="local")
    expect(page.locator("#hardware summary")).to_contain_text("on local")
    expect(page.locator("#id_name")).to_have_value("browser1")
    expect(page.locator("#id_script")).to_have_value("#!/bin/sh\necho browser-made")
    machine_types = page.locator("#id_machine_type option").all_text_contents()
    assert "q35" in machine_types and machine_types == [
        "Default (pc on x86, virt on Arm)",
        *sorted(local.machine_types),
    ], machine_types
    page.locator("#hardware summary").click()
    page.fill("#id_cpu_sockets", "1")
    page.fill("#id_cpu_cores", "1")
    page.fill("#id_cpu_threads", "1")
    page.fill("#id_smbios_text", "manufacturer=Browser Works")
    page.get_by_role("button", name="Preview cloud-init").click()
    expect(page.locator("#preview")).to_contain_text("local-hostname: browser1")
    expect(page.locator("#preview")).to_contain_text("echo browser-made")
    page.screenshot(path=str(ARTIFACTS / "browser-machine-form.png"), full_page=True)

    page.get_by_role("button", name="Create machine").click()
    expect(page.get_by_role("heading", name="browser1")).to_be_visible()
    expect(page.locator("#machine-status")).to_contain_text("Active", timeout=60_000)
    expect(page.locator("#machine-events")).to_contain_text("copy-on-write")
    expect(page.locator("#serial-log")).to_contain_text("TINY-GUEST hostname=browser1", timeout=90_000)
    made = Machine.objects.get(name="browser1")
    assert made.cpu_topology == [1, 1, 1] and made.smbios == {"manufacturer": "Browser Works"}
    page.screenshot(path=str(ARTIFACTS / "browser-machine-running.png"), full_page=True)

    # Power off from the page; the real domain stops.
    page.get_by_role("button", name="More").click()
    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Force power off").click()
    expect(page.locator("#machine-status")).to_contain_text("off", timeout=30_000)
    machine = Machine.objects.get(name="browser1")
    assert machine.power_state == "off"

    page.get_by_role("link", name="Delete").click()
    page.get_by_role("button", name="Delete browser1").click()
    expect(page.get_by_role("heading", name="Machines")).to_be_visible()
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    page.screenshot(path=str(ARTIFACTS / "browser-machine-deleted.png"), full_page=True)

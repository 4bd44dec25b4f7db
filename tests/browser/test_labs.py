"""A lab in the browser: a template written on its page, a lab made from it, its machines' states changing on
the lab page without a reload (htmx polling), powered from the page, deleted: gunicorn, the worker, the BMC
server and libvirtd for real."""

import pytest
from playwright.sync_api import expect

from labs.models import Lab, LabTemplate
from machines.models import Machine
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS, wait_for
from tests.factories import UserFactory
from tests.integration.test_labs import domstate, lab_network  # noqa: F401 - the isolated network fixture

pytestmark = pytest.mark.browser


def test_staff_write_a_template_and_run_a_lab_from_the_browser(page, web_server, local, bmc_server, lab_network):  # noqa: F811
    UserFactory(username="labops", password="correct-horse-battery", is_staff=True)
    login(page, web_server, "labops", "correct-horse-battery")
    page.locator("#nav").get_by_role("link", name="Labs").click()
    page.get_by_role("link", name="New lab from a template").click()
    page.get_by_role("link", name="New template").click()
    page.fill("#id_name", "metal-pair")
    page.fill("#id_spec", "bootable_vms:\n  vars: {vm_count: 2, vm_ram: [128]}\n")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".invalid-feedback").first).to_contain_text("vm_ram is a whole number")
    assert not LabTemplate.objects.exists()
    spec = (
        "bootable_vms:\n  vars:\n    vm_count: 2\n    vm_ram: 128\n    vm_disk_size: 1\n"
        f"    vm_networks: {{{lab_network}: {{interface: eth0, dhcp: false, address: 10.78.0.10/24}}}}\n"
    )
    page.fill("#id_spec", spec)
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("heading", name="Template metal-pair")).to_be_visible()

    page.fill("#id_name", "blab")
    page.fill("#id_pattern__bootable_vms", "{lab}-node-{n}")
    page.get_by_role("button", name="Make the lab").click()
    expect(page.get_by_role("heading", name="Lab blab")).to_be_visible()
    table = page.locator("#lab-machines")
    expect(table).to_contain_text("blab-node-0")
    expect(table).to_contain_text("10.78.0.11/24")
    # Active and off, each, as the worker reports it: seen by the page's polling, no reload.
    expect(table.locator("tbody tr")).to_have_count(2)
    for row in table.locator("tbody tr").all():
        expect(row).to_contain_text("Active", timeout=60_000)
        expect(row).to_contain_text("off", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "browser-lab-made.png"), full_page=True)
    machines = list(Machine.objects.order_by("name"))
    wait_for(lambda: all(Machine.objects.get(pk=m.pk).bmc_listening for m in machines), 20)

    page.locator("#lab-power").get_by_role("button", name="Start").click()
    expect(page.locator(".alert-success")).to_contain_text("Start: blab-node-0, blab-node-1.")
    for row in table.locator("tbody tr").all():
        expect(row).to_contain_text("running", timeout=60_000)
    assert all(domstate(m) == "running" for m in machines)
    page.screenshot(path=str(ARTIFACTS / "browser-lab-running.png"), full_page=True)

    page.get_by_role("link", name="Delete lab").click()
    page.get_by_role("button", name="Delete lab blab").click()
    expect(page.locator(".alert-success")).to_contain_text("Deleting lab blab")
    wait_for(lambda: not Machine.objects.exists(), 90)
    assert not Lab.objects.exists()

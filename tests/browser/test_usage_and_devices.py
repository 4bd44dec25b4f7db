"""Two pages in Chromium as their users see them: the usage report of a month (staff), with its tables by
project and by user and the CSV links, and a machine's Devices page with its disks, NICs and CD-ROM drives
and the attach forms. Served by gunicorn under the Content-Security-Policy (the page fixture fails on any
violation); the screenshots are kept in the test artifacts."""

from datetime import UTC, datetime

import pytest
from playwright.sync_api import expect

from machines.models import MachineNic
from machines.states import PowerState, Status
from metrics.models import UsageHour
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS
from tests.factories import HypervisorFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.browser


def test_the_usage_report_of_a_month_by_project_and_by_user(page, web_server, transactional_db):
    UserFactory(username="ops", password="correct-horse-battery", is_staff=True, is_superuser=True)
    alice, bob = UserFactory(username="alice-u"), UserFactory(username="bob-u")
    team = ProjectFactory(name="team-red")
    for hour in range(48):  # two days of November: alice's in the project, bob's of his own
        at = datetime(2026, 11, 3, tzinfo=UTC).replace(hour=hour % 24, day=3 + hour // 24)
        for who, project, name in ((alice, team, "red-1"), (bob, None, "bob-1")):
            UsageHour.objects.create(
                at=at,
                machine_uuid=f"00000000-0000-0000-0000-00000000000{0 if who is alice else 1}",
                machine_name=name,
                owner=who,
                project=project,
                vcpu_hours=2.0,
                memory_gib_hours=4.0,
                disk_gib_days=10 / 24,
            )
    login(page, web_server, "ops", "correct-horse-battery")
    page.goto(f"{web_server}/usage/?month=2026-11")
    expect(page.locator("h1")).to_have_text("Usage in November 2026")
    by_project = page.locator("#usage-by-project")
    expect(by_project).to_contain_text("team-red")
    expect(by_project.locator("tr", has_text="team-red")).to_contain_text("96.0")  # 48 hours x 2 vCPUs
    expect(by_project.locator("tr", has_text="team-red").locator("td").nth(1)).to_have_text("1")  # one machine
    expect(page.locator("#usage-by-user")).to_contain_text("bob-u")
    expect(page.locator("#usage-csv-project")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "browser-usage-month.png"), full_page=True)
    page.goto(f"{web_server}/usage/?month=2026-13")
    expect(page.locator("#usage-month-error")).to_be_visible()


def test_the_devices_page_lists_disks_nics_and_drives_with_their_forms(page, web_server, transactional_db):
    owner = UserFactory(username="devs", password="correct-horse-battery")
    hv = HypervisorFactory(name="devices-host", uri="test:///default")
    machine = MachineFactory(
        name="devices-vm",
        owner=owner,
        hypervisor=hv,
        status=Status.ACTIVE,
        power_state=PowerState.OFF,
        extra_disks=[{"size_gib": 2, "n": 1}],
    )
    MachineNic.objects.create(machine=machine, index=0, type="network", source="default", mac="52:54:00:aa:bb:01")
    login(page, web_server, "devs", "correct-horse-battery")
    page.goto(f"{web_server}/machines/{machine.pk}/devices/")
    expect(page.locator("#device-disks")).to_contain_text("2 GiB")
    expect(page.locator("#device-nics")).to_contain_text("52:54:00:aa:bb:01")
    expect(page.locator("#btn-disk-attach")).to_be_enabled()
    expect(page.locator("#btn-nic-attach")).to_be_disabled()  # no network here that the owner may use
    expect(page.locator("#btn-cdrom-add")).to_be_enabled()
    page.screenshot(path=str(ARTIFACTS / "browser-devices.png"), full_page=True)

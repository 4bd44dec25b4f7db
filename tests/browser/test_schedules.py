"""Scheduled actions in the browser: the machine page's Schedules card (loaded by htmx from labs) takes a
shut-down on weekdays and a snapshot every day with a retention count, lists both, and deletes one, each without
a reload; what the page shows is what the database holds. gunicorn for real; no worker needed (a schedule runs
at its minute, which the worker's tests cover)."""

import pytest
from playwright.sync_api import expect

from hypervisors.models import HypervisorStatus
from labs.models import ScheduledAction
from machines.states import PowerState, Status
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS
from tests.factories import HypervisorFactory, MachineFactory, UserFactory

pytestmark = pytest.mark.browser


def test_an_owner_adds_a_shut_down_and_a_snapshot_schedule_and_deletes_one(page, web_server, transactional_db):
    owner = UserFactory(username="scheduler", password="correct-horse-battery")
    hv = HypervisorFactory(name="sched-host", uri="test:///default", status=HypervisorStatus.ONLINE)
    machine = MachineFactory(
        name="nightly", owner=owner, hypervisor=hv, status=Status.ACTIVE, power_state=PowerState.RUNNING
    )
    login(page, web_server, "scheduler", "correct-horse-battery")
    page.goto(f"{web_server}/machines/{machine.pk}/")
    card = page.locator("#schedules-card")
    expect(card.locator(".card-header")).to_contain_text("Scheduled actions")  # swapped in by htmx
    expect(card).to_contain_text("None.")

    # A shut-down at 19:30 on Monday to Friday.
    form = card.locator("#schedule-form")
    form.locator("#id_action").select_option(label="Shut down")
    form.locator("#id_hour").fill("19")
    form.locator("#id_minute").fill("30")
    for day in range(5):  # Mon to Fri, the boxes beside their day names
        form.locator(f"input[name=weekdays][value='{day}']").check()
    form.get_by_role("button", name="Add schedule").click()
    expect(card).to_contain_text("Shut down at 19:30 on Mon, Tue, Wed, Thu, Fri")
    expect(card).not_to_contain_text("None.")

    # A snapshot at 02:05 every day, keeping 4 (the form, swapped in again, is empty of the last one's days).
    form = card.locator("#schedule-form")
    form.locator("#id_action").select_option(label="Take a snapshot")
    form.locator("#id_hour").fill("2")
    form.locator("#id_minute").fill("5")
    form.locator("#id_retention").fill("4")
    form.get_by_role("button", name="Add schedule").click()
    expect(card).to_contain_text("Take a snapshot at 02:05 every day, keeping 4")
    expect(card.locator("li")).to_have_count(2)
    page.screenshot(path=str(ARTIFACTS / "browser-schedules.png"), full_page=True)
    rows = ScheduledAction.objects.filter(machine=machine).order_by("pk")
    assert [(s.action, s.hour, s.minute, s.weekdays, s.retention) for s in rows][0][:4] == (
        "power_off",
        19,
        30,
        [0, 1, 2, 3, 4],
    )
    assert [(s.action, s.hour, s.minute, s.weekdays, s.retention) for s in rows][1] == ("snapshot", 2, 5, [], 4)
    assert {s.created_by for s in rows} == {owner}

    # A bad time is refused on the card, nothing made.
    form = card.locator("#schedule-form")
    form.locator("#id_action").select_option(label="Power on")
    form.locator("#id_hour").fill("")
    form.get_by_role("button", name="Add schedule").click()
    expect(card.locator(".text-danger").first).to_be_visible()
    assert ScheduledAction.objects.filter(machine=machine).count() == 2

    # Delete the shut-down: the card lists the snapshot alone; so does the database.
    card.locator("li", has_text="Shut down at 19:30").get_by_role("button", name="delete").click()
    expect(card).not_to_contain_text("Shut down at 19:30")
    expect(card).to_contain_text("Take a snapshot at 02:05 every day, keeping 4")
    expect(card.locator("li")).to_have_count(1)
    assert list(ScheduledAction.objects.filter(machine=machine).values_list("action", flat=True)) == ["snapshot"]
    page.screenshot(path=str(ARTIFACTS / "browser-schedules-deleted.png"), full_page=True)

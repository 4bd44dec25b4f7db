"""A project viewer's console in headless Chromium: the screen shows, and typing goes nowhere, even from a
page tampered with so that noVNC sends the keys (the proxy's filter drops them, not the page)."""

import re

import pytest

from machines import consoles, services
from machines.models import Machine, Membership
from tests.browser.test_console import open_console, type_into_console
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import ProjectFactory, UserFactory
from tests.integration.test_console_auth import console_log_since, console_log_size, rfb_session
from tests.rfb_client import key_events

pytestmark = pytest.mark.browser

CONSOLE_JS = re.compile(r".*/console(\.[0-9a-f]{8,})?\.js$")


def test_a_viewer_types_in_the_console_and_nothing_reaches_the_guest(
    page, web_server, console_proxy, worker, local, tiny_iso
):
    owner = UserFactory(username="vo-owner", password="correct-horse-battery")
    machine = services.machine_create(
        owner=owner, hypervisor=local, name="vo1", deploy_type="iso", image=tiny_iso, memory_mib=256, disk_gib=1
    )
    wait_for(lambda: Machine.objects.get(pk=machine.pk).status == "active", 120)
    serial_log(machine.pk, "TINY-GUEST ready")
    project = ProjectFactory(name="vo-project")
    Machine.objects.filter(pk=machine.pk).update(project=project)
    viewer = UserFactory(username="vo-viewer", password="correct-horse-battery")
    Membership.objects.create(project=project, user=viewer, role="viewer")

    # The page would tell noVNC not to send input; this one is tampered with so that it does.
    def tampered(route):
        response = route.fetch()
        body = response.text()
        assert "rfb.viewOnly = viewOnly;" in body
        route.fulfill(response=response, body=body.replace("rfb.viewOnly = viewOnly;", "rfb.viewOnly = false;"))

    page.route(CONSOLE_JS, tampered)
    log_start = console_log_size()
    login(page, web_server, "vo-viewer", "correct-horse-battery")
    page.goto(f"{web_server}{machine.get_absolute_url()}")
    open_console(page, "Connected (view only)")
    type_into_console(page, "echo viewer-typed-in-chromium >/dev/console\n")
    page.screenshot(path=str(ARTIFACTS / "browser-console-view-only.png"))
    page.close()  # ends the session: the proxy logs what it dropped

    # noVNC did send the keys (the proxy counted them), and the guest never saw them: the owner's typing,
    # which comes after, reaches its shell alone.
    session = wait_for(lambda: machine.console_sessions.filter(user=viewer, ended__isnull=False).first(), 15)
    dropped = wait_for(
        lambda: re.search(rf"console session {session.pk}: (\d+) input messages dropped", console_log_since(log_start)),
        15,
    )
    assert int(dropped.group(1)) >= 2 * len("echo viewer-typed-in-chromium >/dev/console\n")  # each key down and up
    raw, _ = consoles.console_token_issue(machine=Machine.objects.get(pk=machine.pk), user=owner)
    ws, *_ = rfb_session(console_proxy, machine, raw, 8)
    for event in key_events("echo owner-typed-after >/dev/console\n"):
        ws.send(event)
    log = serial_log(machine.pk, "owner-typed-after")
    ws.close()
    assert "viewer-typed-in-chromium" not in log

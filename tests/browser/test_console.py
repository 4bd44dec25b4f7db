"""The console in headless Chromium: noVNC through the portal's proxy to a real guest's screen."""

import pytest
from playwright.sync_api import expect
from rest_framework.test import APIClient

from machines import services
from machines.models import Machine
from portal.models import ApiToken
from tests.browser.test_hypervisors import login
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.browser

# Playwright's keyboard.type() loses Shift on noVNC (QEMU takes scancodes): press shifted keys explicitly.
SHIFTED = {
    ">": "Shift+Period",
    "|": "Shift+Backslash",
    "$": "Shift+Digit4",
    "(": "Shift+Digit9",
    ")": "Shift+Digit0",
    "*": "Shift+Digit8",
    "_": "Shift+Minus",
    ":": "Shift+Semicolon",
    '"': "Shift+Quote",
}


def type_into_console(page, text: str) -> None:
    for ch in text:
        if ch in SHIFTED:
            page.keyboard.press(SHIFTED[ch])
        elif ch.isupper():
            page.keyboard.press(f"Shift+Key{ch}")
        elif ch == "\n":
            page.keyboard.press("Enter")
        else:
            page.keyboard.press(ch)


def screen_drawn(page) -> bool:
    """The noVNC canvas shows a real frame: more than one colour, and text covering a share of it
    (a blank or uniform frame has one colour)."""
    colours, lit = page.evaluate("""() => {
        const c = document.querySelector('#console-screen canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        let lit = 0, n = 0;
        for (let i = 0; i < d.length; i += 4 * 7, n++) {
            seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);
            if (d[i] + d[i + 1] + d[i + 2] > 60) lit++;
        }
        return [seen.size, lit / n];
    }""")
    return colours >= 2 and 0.01 < lit < 0.99


def open_console(page, status: str = "Connected") -> None:
    """From a machine page: open its console, wait until connected with `status` and the guest's screen
    drawn, and focus the canvas for typing."""
    page.locator("#btn-console").click()
    page.wait_for_function("() => window.portalConsole && window.portalConsole.state === 'connected'", timeout=30_000)
    expect(page.locator("#console-status")).to_have_text(status)
    wait_for(lambda: screen_drawn(page), 20, message="the console canvas stayed blank")
    page.locator("#console-screen canvas").click()


@pytest.fixture
def running_iso(worker, local, tiny_iso):
    owner = UserFactory(username="consoler", password="correct-horse-battery")
    machine = services.machine_create(
        owner=owner, hypervisor=local, name="console1", deploy_type="iso", image=tiny_iso, memory_mib=256, disk_gib=1
    )
    wait_for(lambda: Machine.objects.get(pk=machine.pk).status == "active", 120)
    serial_log(machine.pk, "TINY-GUEST ready")
    return Machine.objects.get(pk=machine.pk)


def test_console_shows_the_guest_and_typing_reaches_its_shell(page, web_server, console_proxy, running_iso):
    login(page, web_server, "consoler", "correct-horse-battery")
    page.goto(f"{web_server}{running_iso.get_absolute_url()}")
    open_console(page)
    type_into_console(page, "echo novnc-typed-ok >/dev/console\n")
    serial_log(running_iso.pk, "novnc-typed-ok")
    # The page's own "Paste text" types shifted characters correctly too.
    page.locator("#btn-paste").click()
    page.fill("#paste-text", "echo PASTED_$((6*7)) >/dev/console\n")
    page.locator("#btn-type").click()
    serial_log(running_iso.pk, "PASTED_42")
    page.screenshot(path=str(ARTIFACTS / "browser-console.png"))


def test_one_time_console_url_from_the_api_works_once_without_a_session(
    browser, web_server, console_proxy, running_iso
):
    _, raw = ApiToken.issue(user=running_iso.owner)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    body = api.post(
        f"/api/v1/machines/{running_iso.pk}/console/", HTTP_HOST=f"127.0.0.1:{web_server.rsplit(':', 1)[1]}"
    ).json()
    assert body["url"].startswith(f"{web_server}/console/#m={running_iso.pk}&t=") and body["expires_at"]

    context = browser.new_context(viewport={"width": 1024, "height": 700})  # no portal session
    page = context.new_page()
    page.goto(body["url"])
    page.wait_for_function("() => window.portalConsole && window.portalConsole.state === 'connected'", timeout=30_000)
    assert "#" not in page.url  # the credential left the address bar and history
    wait_for(lambda: screen_drawn(page), 20)
    page.screenshot(path=str(ARTIFACTS / "browser-console-one-time-url.png"))
    # Reconnect within the grace spends the same token again: the proxy lets it in only because the page
    # kept the fragment's reconnect secret and offers it (a websocket subprotocol).
    from machines.models import ConsoleSession

    page.locator("#btn-reconnect").click()
    wait_for(lambda: ConsoleSession.objects.filter(machine=running_iso).count() == 2, 15, message="no reconnect")
    page.wait_for_function("() => window.portalConsole.state === 'connected'", timeout=15_000)
    assert len({s.token_id for s in ConsoleSession.objects.filter(machine=running_iso)}) == 1
    context.close()

    # Used once: after the reconnect grace, opening the same URL again is refused.
    from datetime import timedelta

    from django.utils import timezone

    from machines.models import ConsoleToken

    ConsoleToken.objects.update(used_at=timezone.now() - timedelta(minutes=5))
    context = browser.new_context()
    page = context.new_page()
    page.goto(body["url"])
    page.wait_for_function("() => window.portalConsole && window.portalConsole.state === 'failed'", timeout=30_000)
    context.close()


def test_serial_console_in_xterm_is_an_interactive_shell(page, web_server, console_proxy, running_iso):
    login(page, web_server, "consoler", "correct-horse-battery")
    page.goto(f"{web_server}{running_iso.get_absolute_url()}")
    page.locator("#btn-serial").click()
    page.wait_for_function("() => window.portalConsole && window.portalConsole.state === 'connected'", timeout=30_000)
    expect(page.locator("#console-status")).to_have_text("Connected")
    page.locator("#serial-screen").click()
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.portalConsole.text().includes('# ')", timeout=20_000)
    page.keyboard.type("echo XTERM_$((6*7)) $(hostname)\n")
    page.wait_for_function("() => window.portalConsole.text().includes('XTERM_42 tiny')", timeout=20_000)
    assert "XTERM_42 tiny" in serial_log(running_iso.pk, "XTERM_42")  # the guest's own serial log has it too
    page.screenshot(path=str(ARTIFACTS / "browser-serial-console.png"))
    # While this page holds the serial port, a second page is refused and says why; it can take the port over.
    other = page.context.new_page()
    other.goto(f"{web_server}/machines/{running_iso.pk}/serial/")
    other.wait_for_function("() => window.portalConsole && window.portalConsole.state === 'failed'", timeout=30_000)
    expect(other.locator("#console-status")).to_contain_text("Active console session")
    other.get_by_role("button", name="Take over").click()
    other.wait_for_function("() => window.portalConsole.state === 'connected'", timeout=30_000)
    page.wait_for_function("() => window.portalConsole.state !== 'connected'", timeout=30_000)  # the first one let go
    other.screenshot(path=str(ARTIFACTS / "browser-serial-take-over.png"))
    other.close()

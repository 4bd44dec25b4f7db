import os
import tempfile

import pytest
from playwright.sync_api import sync_playwright

# Playwright's sync API keeps an event loop in this thread; the ORM calls the tests
# make between page steps are still plain synchronous code.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: scripts/setup-host.sh --test installs it"
    home = tempfile.mkdtemp(prefix="portal-chromium-")
    os.environ["XDG_CONFIG_HOME"] = os.environ["XDG_CACHE_HOME"] = home
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(30_000)
    # Chromium logs each Content-Security-Policy violation to the console: any one fails the test, so every
    # browser test also shows that its pages run whole under the policy (portal/security.py).
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    yield page
    context.close()
    assert not violations, f"Content-Security-Policy violations: {violations}"

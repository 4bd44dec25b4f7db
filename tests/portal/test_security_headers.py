"""Security headers on every kind of response, and pages that the Content-Security-Policy lets run whole: no
inline script without the response's nonce, no inline event handler, no javascript: URL."""

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.test import Client
from rest_framework.test import APIClient

from machines.states import Status
from portal.models import ApiToken
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def directives(response) -> dict[str, list[str]]:
    policy = response["Content-Security-Policy"]
    return {part.split()[0]: part.split()[1:] for part in policy.split("; ")}


class Scripts(HTMLParser):
    """The page's inline scripts (with their nonce), event-handler attributes and javascript: URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str | None] = []
        self.handlers: list[str] = []
        self.js_urls: list[str] = []
        self._in_script: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.handlers += [f"<{tag} {name}>" for name, _ in attrs if name.startswith("on")]
        self.js_urls += [v for v in a.values() if v and v.strip().lower().startswith("javascript:")]
        if tag == "script" and "src" not in a and a.get("type") not in ("application/json",):
            self.inline.append(a.get("nonce"))


def check_page(response) -> None:
    """The headers every response carries, and a page that runs under its own policy."""
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] in ("same-origin", "no-referrer")
    d = directives(response)
    assert d["frame-ancestors"] == ["'none'"] and d["object-src"] == ["'none'"] and d["base-uri"] == ["'none'"]
    assert "'unsafe-inline'" not in d["script-src"] and "'unsafe-eval'" not in d["script-src"]
    assert d["default-src"] == ["'self'"]
    if not response["Content-Type"].startswith("text/html"):
        return
    nonce = next(s[len("'nonce-") : -1] for s in d["script-src"] if s.startswith("'nonce-"))
    page = Scripts()
    page.feed(response.content.decode())
    assert not page.handlers, page.handlers
    assert not page.js_urls, page.js_urls
    assert all(n == nonce for n in page.inline), (page.inline, nonce)


@pytest.fixture
def machine(staff):
    hv = HypervisorFactory(name="h1")
    return MachineFactory(
        name="m1",
        owner=staff,
        hypervisor=hv,
        image=ImageFactory(ready=True),
        status=Status.ACTIVE,
        power_state="running",
    )


NAVIGATE = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Sec-Fetch-Site": "same-origin"}


def test_the_main_pages_carry_the_headers_and_run_under_their_policy(staff_client, machine):
    paths = [
        "/",
        "/machines/",
        "/machines/new/",
        f"/machines/{machine.pk}/",
        "/hypervisors/",
        f"/hypervisors/{machine.hypervisor.pk}/",
        "/hypervisors/images/",
        "/account/",
        "/audit/",
        "/admin/",
        "/admin/auth/user/",
        "/api/v1/",  # the browsable API
    ]
    for path in paths:
        r = staff_client.get(path, headers={"Accept": "text/html"})
        assert r.status_code == 200, path
        check_page(r)


def test_the_console_pages_run_under_their_policy_and_may_reach_the_console_proxy(staff_client, machine, settings):
    settings.PORTAL_CONSOLE_URL = ""
    for path in (f"/machines/{machine.pk}/console/", f"/machines/{machine.pk}/serial/", "/console/"):
        r = staff_client.get(path, headers=NAVIGATE)
        assert r.status_code == 200, path
        check_page(r)
        page = Scripts()
        page.feed(r.content.decode())
        assert len(page.inline) == 1  # the early websocket, with the nonce
        p = settings.PORTAL_CONSOLE_PORT
        assert directives(r)["connect-src"] == ["'self'", f"ws://testserver:{p}", f"wss://testserver:{p}"]
    settings.PORTAL_CONSOLE_URL = "wss://portal.example.org/console"
    r = staff_client.get(f"/machines/{machine.pk}/console/")
    assert directives(r)["connect-src"] == ["'self'", "wss://portal.example.org"]


def test_each_response_gets_its_own_nonce(staff_client, machine):
    nonces = {directives(staff_client.get(f"/machines/{machine.pk}/console/"))["script-src"][1] for _ in range(3)}
    assert len(nonces) == 3


def test_the_login_page_and_the_api_carry_them_too(client, staff):
    check_page(client.get("/login/"))
    _, raw = ApiToken.issue(user=staff)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    for r in (api.get("/api/v1/machines/"), APIClient().get("/api/v1/machines/"), api.get("/api/v1/schema/")):
        check_page(r)


def test_no_template_has_an_inline_handler_or_a_script_without_the_nonce():
    """Pages the tests above do not open are held by their templates."""
    found = []
    for path in sorted((ROOT / "templates").rglob("*.html")):
        text = path.read_text()
        found += [f"{path.name}: {m}" for m in re.findall(r"\son[a-z]+\s*=", text)]
        for tag in re.findall(r"<script\b[^>]*>", text):
            if "src=" not in tag and "application/json" not in tag and "{{ request.csp_nonce }}" not in tag:
                found.append(f"{path.name}: {tag}")
    assert not found, found


def test_behind_tls_hsts_and_secure_cookies_are_on(tmp_path):
    """The settings a TLS deploy gets (read in a fresh process: settings are read once)."""
    env = {**os.environ, "PORTAL_BEHIND_TLS_PROXY": "true", "PORTAL_DATA_DIR": str(tmp_path)}
    code = (
        "import django, json; django.setup(); from django.conf import settings as s; print(json.dumps(["
        "s.SECURE_HSTS_SECONDS, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_PROXY_SSL_HEADER]))"
    )

    def run(extra: dict) -> str:
        env = {**extra, "DJANGO_SETTINGS_MODULE": "config.settings"}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    assert json.loads(run(env)) == [31536000, True, True, ["HTTP_X_FORWARDED_PROTO", "https"]]
    assert json.loads(run({**env, "PORTAL_HSTS_SECONDS": "600"}))[0] == 600


def test_hsts_is_sent_on_requests_that_came_over_tls(settings, staff):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SESSION_COOKIE_SECURE = True
    client = Client()
    r = client.post(
        "/login/",
        {"username": staff.username, "password": "correct-horse-battery"},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert r.status_code == 302 and r["Strict-Transport-Security"] == "max-age=31536000"
    assert r.cookies["sessionid"]["secure"] and r.cookies["sessionid"]["httponly"]
    assert "Strict-Transport-Security" not in client.get("/login/")  # plain http: never

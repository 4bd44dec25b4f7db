"""scripts/portal-inventory against a local HTTP server the test starts (on loopback): what it asks, what it
answers to --list and --host, and a clear message with a non-zero exit for each failure; then as Ansible's
script inventory plugin runs it."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "portal-inventory"
ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"
INVENTORY = {
    "_meta": {"hostvars": {"web1": {"ansible_host": "192.0.2.5", "portal_vcpus": 2}, "ctrl-1": {}}},
    "all": {"children": ["lab_a", "provisioned_vms"]},
    "lab_a": {"hosts": ["ctrl-1", "web1"]},
    "provisioned_vms": {"hosts": ["web1"]},
}


class Portal(http.server.ThreadingHTTPServer):
    """Answers every GET with (status, content type, body) as the test sets it, and keeps what was asked."""

    answer: tuple[int, str, bytes] = (200, "application/json", json.dumps(INVENTORY).encode())
    requests: list[dict]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Portal

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        status, content_type, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def portal():
    server = Portal(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _env(portal=None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    if portal is not None:
        env |= {"PORTAL_URL": f"http://127.0.0.1:{portal.server_address[1]}/", "PORTAL_TOKEN": "tok-123"}
    return env | extra


def _run(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_it_is_an_executable_with_a_python_shebang():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_list_answers_the_inventory_asked_with_the_token(portal):
    r = _run("--list", env=_env(portal))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == INVENTORY
    assert portal.requests == [{"path": "/api/v1/inventory/", "authorization": "Token tok-123"}]


def test_lab_project_and_bmc_come_from_the_environment(portal):
    env = _env(portal, PORTAL_INVENTORY_LAB="lab a", PORTAL_INVENTORY_PROJECT="7", PORTAL_INVENTORY_BMC="1")
    assert _run("--list", env=env).returncode == 0
    assert portal.requests[0]["path"] == "/api/v1/inventory/?lab=lab+a&project=7&bmc=true"


def test_host_answers_its_variables_and_nothing_for_a_host_it_does_not_know(portal):
    r = _run("--host", "web1", env=_env(portal))
    assert r.returncode == 0 and json.loads(r.stdout) == {"ansible_host": "192.0.2.5", "portal_vcpus": 2}
    r = _run("--host", "nobody", env=_env(portal))
    assert r.returncode == 0 and json.loads(r.stdout) == {}


@pytest.mark.parametrize("missing", ["PORTAL_URL", "PORTAL_TOKEN"])
def test_a_missing_variable_is_named(portal, missing):
    env = _env(portal)
    del env[missing]
    r = _run("--list", env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert f"{missing} is not set" in r.stderr
    assert portal.requests == []


def test_a_url_that_is_not_http_is_refused():
    r = _run("--list", env=_env(PORTAL_URL="file:///etc/passwd", PORTAL_TOKEN="t"))
    assert r.returncode == 1 and "http:// or https://" in r.stderr


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((401, "application/json", b'{"detail": "Invalid token."}'), "answered 401 for"),
        ((401, "application/json", b'{"detail": "Invalid token."}'), "Invalid token."),
        ((400, "application/json", b'{"lab": ["No lab \'x\' that you may see."]}'), "lab: No lab 'x'"),
        ((500, "text/html", b"<h1>Server Error</h1>"), "answered 500"),
        ((200, "text/html", b"<html>login</html>"), "is not JSON"),
        ((200, "application/json", b'{"hosts": []}'), "not an Ansible inventory"),
        ((200, "application/json", b'{"_meta": []}'), "not an Ansible inventory"),
    ],
)
def test_an_error_answer_exits_non_zero_with_the_reason(portal, answer, said):
    portal.answer = answer
    r = _run("--list", env=_env(portal))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("portal-inventory: ") and said in r.stderr


def test_an_unreachable_portal_is_said_so():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _run("--list", env=_env(PORTAL_URL=f"http://127.0.0.1:{port}", PORTAL_TOKEN="t"))
    assert r.returncode == 1 and "cannot reach the portal" in r.stderr


def test_it_wants_list_or_host():
    r = _run(env=_env())
    assert r.returncode == 2 and "--list" in r.stderr


def _ansible_inventory(tmp_path, env) -> subprocess.CompletedProcess:
    env = env | {"HOME": str(tmp_path), "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"}
    return subprocess.run(
        [str(ANSIBLE_INVENTORY), "-i", str(SCRIPT), "--list"], capture_output=True, text=True, env=env, timeout=120
    )


def test_ansibles_script_plugin_reads_it(portal, tmp_path):
    r = _ansible_inventory(tmp_path, _env(portal))
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert listed["provisioned_vms"]["hosts"] == ["web1"]
    assert listed["_meta"]["hostvars"]["web1"] == {"ansible_host": "192.0.2.5", "portal_vcpus": 2}
    assert len(portal.requests) == 1  # _meta is there: Ansible never calls --host


def test_ansible_shows_the_scripts_reason(portal, tmp_path):
    portal.answer = (401, "application/json", b'{"detail": "Invalid token."}')
    r = _ansible_inventory(tmp_path, _env(portal))
    assert r.returncode != 0
    assert "Invalid token." in r.stderr

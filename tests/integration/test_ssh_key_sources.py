"""SSH key sources through the real stack: the account page saves a source, the real Huey worker fetches it from
an HTTPS server this test starts on 127.0.0.1 (its certificate signed by a CA made here, which the worker trusts
through PORTAL_SSH_KEY_CA_FILE), and the page, the audit and new machines see the result; a redirect to an address
the worker may not reach and an oversized answer are refused, the keys from before kept."""

import shutil

import pytest
from django.test import Client
from django.utils.html import escape

from portal.models import AuditEvent, SshKey
from portal.sshkeys import describe
from tests.conftest import FILE_SERVER_NETWORK, SSH_KEY_CA_FILE, wait_for
from tests.factories import UserFactory
from tests.key_server import Answer, KeyServer, make_ca_and_cert, redirect, ssh_keygen

pytestmark = pytest.mark.integration


@pytest.fixture
def tls(worker, settings, tmp_path):
    settings.PORTAL_IMPORT_ALLOWED_NETWORKS = [FILE_SERVER_NETWORK]  # the account form checks address literals
    paths = make_ca_and_cert(tmp_path)
    shutil.copy(paths["ca"], SSH_KEY_CA_FILE)
    yield paths
    SSH_KEY_CA_FILE.unlink(missing_ok=True)


@pytest.fixture
def key_server(tls):
    server = KeyServer(tls["cert"], tls["key"], "127.0.0.1")
    yield server
    server.close()


def _fetches() -> int:
    return AuditEvent.objects.filter(action="ssh_key.fetch").count()


def _refresh(client: Client, key: SshKey) -> SshKey:
    """Refresh from the page; wait for the worker's audited result."""
    before = _fetches()
    assert client.post(f"/account/keys/{key.pk}/refresh/").status_code == 302
    wait_for(lambda: _fetches() > before, 30, message="the worker recorded no fetch")
    return SshKey.objects.get(pk=key.pk)


def test_the_worker_fetches_a_source_over_https_and_refuses_what_it_must(key_server, tls, tmp_path):
    made = [ssh_keygen(tmp_path, name, kind) for name, kind in (("ed", "ed25519"), ("rsa", "rsa"))]
    keys, listed = [line for line, _ in made], [out for _, out in made]
    key_server.routes["/alice.keys"] = Answer(body="\n".join([keys[0], "no key here", keys[1]]).encode() + b"\n")
    user = UserFactory(username="alice")
    client = Client()
    client.force_login(user)
    source = f"{key_server.url}/alice.keys"

    r = client.post("/account/keys/", {"name": "alice", "source": source})
    assert r.status_code == 302
    key = wait_for(lambda: (k := SshKey.objects.get(user=user)).fetched and k, 30, message="the worker did not fetch")
    assert key.public_key.splitlines() == keys
    assert key.fetch_error == "1 line was not a valid key: line 2: " + key.fetch_error.split("line 2: ", 1)[1]
    assert key_server.requests == ["/alice.keys"]
    event = AuditEvent.objects.get(action="ssh_key.fetch")
    assert (event.outcome, event.detail.startswith(f"2 keys from {source}")) == ("success", True)
    page = client.get("/account/").content.decode()
    assert "2 keys, fetched " in page
    assert all(escape(out) in page for out in listed)  # each as `ssh-keygen -l -f` printed it
    assert all(str(describe(k)) == out for k, out in zip(keys, listed, strict=True))
    offered = client.get("/machines/new/").content.decode()
    assert all(k.split()[1] in offered for k in keys)

    key_server.routes["/alice.keys"] = Answer(body=b"#" * (65 * 1024))
    key = _refresh(client, key)
    assert "over the import limit of 64 KiB" in key.fetch_error and key.public_key.splitlines() == keys
    assert "the 2 keys fetched before kept" in key.fetch_error
    assert AuditEvent.objects.filter(action="ssh_key.fetch").latest("pk").outcome == "refused"

    elsewhere = KeyServer(tls["cert"], tls["key"], "127.0.0.2")  # loopback, but not what the stack allows
    try:
        elsewhere.routes["/alice.keys"] = Answer(body=keys[0].encode())
        key_server.routes["/alice.keys"] = redirect(f"{elsewhere.url}/alice.keys")
        key = _refresh(client, key)
        assert "127.0.0.2 is a loopback address" in key.fetch_error and key.public_key.splitlines() == keys
        assert elsewhere.requests == []
    finally:
        elsewhere.close()

    fresh, fresh_listed = ssh_keygen(tmp_path, "new", "ecdsa")
    key_server.routes["/alice.keys"] = Answer(body=fresh.encode())
    key = _refresh(client, key)
    assert (key.public_key, key.fetch_error) == (fresh, "")
    assert escape(fresh_listed) in client.get("/account/").content.decode()
    outcomes = list(AuditEvent.objects.filter(action="ssh_key.fetch").order_by("pk").values_list("outcome", flat=True))
    assert outcomes == ["success", "refused", "refused", "success"]

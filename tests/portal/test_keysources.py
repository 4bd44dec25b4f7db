"""SSH key sources (portal/keysources.py, portal/sshkeys.py): short names expanded, sources checked, fingerprints
as ssh-keygen shows them, and the fetch through the import client against a local HTTPS server with its own CA:
sizes, times, redirects, bad content, what the row and the audit keep."""

import subprocess
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.html import escape

from portal import keysources, sshkeys
from portal.keysources import ssh_key_fetch
from portal.models import AuditEvent, SshKey
from portal.sshkeys import InvalidKeySource, describe, parse_source, source_url
from tests.key_server import Answer, KeyServer, make_ca_and_cert, redirect, ssh_keygen

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD me@laptop"


@pytest.mark.parametrize(
    ("source", "normal", "url"),
    [
        ("gh:octocat", "gh:octocat", "https://github.com/octocat.keys"),
        ("GH:Octo-Cat", "gh:Octo-Cat", "https://github.com/Octo-Cat.keys"),
        (" gh:a ", "gh:a", "https://github.com/a.keys"),
        ("gh:" + "a" * 39, "gh:" + "a" * 39, f"https://github.com/{'a' * 39}.keys"),
        ("lp:some-user", "lp:some-user", "https://launchpad.net/~some-user/+sshkeys"),
        ("lp:j.doe+work", "lp:j.doe+work", "https://launchpad.net/~j.doe+work/+sshkeys"),
        ("https://keys.example/alice.keys", "https://keys.example/alice.keys", "https://keys.example/alice.keys"),
        ("https://keys.example:8443/a?u=1", "https://keys.example:8443/a?u=1", "https://keys.example:8443/a?u=1"),
    ],
)
def test_short_names_expand_and_urls_stay(source, normal, url):
    assert parse_source(source) == normal
    assert source_url(normal) == url


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "Give a URL or a short name"),
        ("gh:", "not a GitHub user name"),
        ("gh:-octocat", "not a GitHub user name"),
        ("gh:octo--cat", "not a GitHub user name"),
        ("gh:octocat-", "not a GitHub user name"),
        ("gh:" + "a" * 40, "not a GitHub user name"),
        ("gh:../../evil", "not a GitHub user name"),
        ("gh:a/b", "not a GitHub user name"),
        ("gh:a?x=1", "not a GitHub user name"),
        ("lp:Upper", "not a Launchpad user name"),
        ("lp:x", "not a Launchpad user name"),
        ("lp:-x", "not a Launchpad user name"),
        ("lp:a/../b", "not a Launchpad user name"),
        ("gh:a b", "no spaces"),
        ("gh:é", "non-ASCII"),
        ("https://keys.example/a\nb", "control"),
        ("http://keys.example/alice.keys", "Give an https:// URL"),
        ("ftp://keys.example/alice.keys", "Give an https:// URL"),
        ("file:///home/alice/.ssh/id_ed25519.pub", "Give an https:// URL"),
        ("keys.example/alice.keys", "Give an https:// URL"),
        ("xx:alice", "Give an https:// URL"),
        ("https:///alice.keys", "names no host"),
        ("https://alice:secret@keys.example/alice.keys", "user name or password"),
        ("https://keys.example/alice.keys#x", "#fragment"),
        ("https://keys.example:99999/alice.keys", "port"),
        ("https://keys.example/" + "a" * 300, "at most 300 characters"),
    ],
)
def test_bad_sources_are_refused_with_the_reason(source, message):
    with pytest.raises(InvalidKeySource, match=message):
        parse_source(source)


def test_http_is_taken_only_where_allowed(settings):
    assert parse_source("http://keys.example/a.keys", allow_http=True) == "http://keys.example/a.keys"
    with pytest.raises(InvalidKeySource, match="Give an https:// URL"):
        keysources.validate_source("http://keys.example/a.keys")
    settings.PORTAL_SSH_KEY_ALLOW_HTTP = True
    assert keysources.validate_source("http://keys.example/a.keys") == "http://keys.example/a.keys"


def test_an_address_literal_the_worker_would_refuse_is_refused_at_once(settings):
    for url in ("https://127.0.0.1/k", "https://169.254.169.254/k", "https://[::1]/k", "https://10.1.2.3/k"):
        with pytest.raises(InvalidKeySource, match="Refused: .* address"):
            keysources.validate_source(url)
    settings.PORTAL_IMPORT_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    assert keysources.validate_source("https://127.0.0.1:8443/k") == "https://127.0.0.1:8443/k"


@pytest.mark.parametrize(("kind", "bits"), [("ed25519", None), ("rsa", 2048), ("rsa", 1025), ("ecdsa", 384)])
def test_fingerprints_are_those_ssh_keygen_prints(tmp_path, kind, bits):
    line, listed = ssh_keygen(tmp_path, f"{kind}{bits or ''}", kind, bits)
    assert str(describe(line)) == listed  # e.g. "256 SHA256:… ed25519@test (ED25519)"
    assert describe(line).fingerprint.startswith("SHA256:") and "=" not in describe(line).fingerprint


def test_a_key_without_a_comment_is_listed_as_ssh_keygen_lists_it(tmp_path):
    line, _ = ssh_keygen(tmp_path, "bare")
    bare = tmp_path / "bare-only.pub"
    bare.write_text(" ".join(line.split()[:2]) + "\n")  # as GitHub's .keys serves them
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(bare)], check=True, capture_output=True, text=True)
    assert str(describe(bare.read_text())) == listed.stdout.strip()  # "256 SHA256:… no comment (ED25519)"


def test_a_line_that_is_no_key_has_no_fingerprint():
    with pytest.raises(sshkeys.InvalidSSHKey):
        describe("ssh-ed25519 AAAA")


# The fetch, against an HTTPS server on 127.0.0.1 whose certificate a CA made here signs.


@pytest.fixture
def tls(tmp_path_factory):
    return make_ca_and_cert(tmp_path_factory.mktemp("key-ca"))


@pytest.fixture
def server(tls, settings):
    settings.PORTAL_IMPORT_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.PORTAL_SSH_KEY_CA_FILE = str(tls["ca"])
    s = KeyServer(tls["cert"], tls["key"])
    yield s
    s.close()


@pytest.fixture
def keys(tmp_path):
    return [ssh_keygen(tmp_path, name)[0] for name in ("one", "two")]


def _source(user, server, path="/alice.keys", old=""):
    return SshKey.objects.create(user=user, name="alice", source=f"{server.url}{path}", public_key=old)


def _fetch(key) -> SshKey:
    ssh_key_fetch(key.pk)
    key.refresh_from_db()
    return key


def _audit():
    return AuditEvent.objects.filter(action="ssh_key.fetch").latest("pk")


@pytest.mark.django_db
def test_a_source_is_fetched_every_line_validated_and_the_bad_ones_reported(server, user, keys):
    body = "\n".join(["# keys of alice", keys[0], "", "not a key at all", keys[1], keys[0], "ssh-rsa AAAA x"])
    server.routes["/alice.keys"] = Answer(body=body.encode())
    key = _fetch(_source(user, server))
    assert key.public_key.splitlines() == keys  # repeats dropped, comments and blank lines skipped
    assert key.fetched is not None and not keysources.last_fetch_failed(key)
    assert key.fetch_error.startswith("2 lines were not a valid key: line 4: ") and "line 7: " in key.fetch_error
    event = _audit()
    assert (event.outcome, event.object_id) == ("success", str(key.pk))
    assert event.detail.startswith(f"2 keys from {server.url}/alice.keys; 2 lines were not a valid key")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (Answer(body=b"<html><body>Sign in</body></html>\n"), "holds no valid SSH key (1 line was not a valid key"),
        (Answer(body=b""), "holds no SSH key"),
        (Answer(body=b"\n# nothing here\n"), "holds no SSH key"),
        (Answer(body=b"ssh-ed25519 \xff\xfe\n"), "not UTF-8 text"),
        (Answer(404, b"no such user"), "answered 404"),
    ],
)
@pytest.mark.django_db
def test_an_answer_without_a_valid_key_is_an_error_that_keeps_the_old_keys(server, user, answer, reason):
    server.routes["/alice.keys"] = answer
    key = _fetch(_source(user, server, old=ED))
    assert key.public_key == ED and key.fetched is None
    assert keysources.last_fetch_failed(key) and reason in key.fetch_error
    assert key.fetch_error.endswith("; the 1 key fetched before kept.")
    assert (_audit().outcome, reason in _audit().detail) == ("failed", True)


@pytest.mark.django_db
def test_an_answer_over_the_size_cap_is_refused_announced_or_not(server, user, keys):
    big = ("\n".join(keys * 400)).encode()
    assert len(big) > 64 * 1024
    for path, length in (("/announced", True), ("/unannounced", False)):
        server.routes[path] = Answer(body=big, length=length)
        key = _fetch(_source(user, server, path))
        assert "over the import limit of 64 KiB" in key.fetch_error and key.public_key == ""
        assert _audit().outcome == "refused"
        key.delete()


@pytest.mark.django_db
def test_a_slow_server_is_cut_at_the_deadline(server, user, keys, settings):
    settings.PORTAL_SSH_KEY_TIMEOUT = 1
    server.routes["/slow"] = Answer(body=keys[0].encode(), drip=0.05)  # each byte well within a read's timeout
    started = time.monotonic()
    key = _fetch(_source(user, server, "/slow"))
    assert time.monotonic() - started < 4
    assert "longer than its limit of 1 s" in key.fetch_error and key.public_key == ""


@pytest.mark.django_db
def test_redirects_are_followed_each_hop_checked(server, tls, user, keys):
    server.routes["/a"] = redirect("/b")
    server.routes["/b"] = redirect(f"{server.url}/alice.keys", 307)
    server.routes["/alice.keys"] = Answer(body=keys[0].encode())
    assert _fetch(_source(user, server, "/a")).public_key == keys[0]

    elsewhere = KeyServer(tls["cert"], tls["key"], "127.0.0.2")  # loopback, but not an allowed network
    try:
        elsewhere.routes["/alice.keys"] = Answer(body=keys[1].encode())
        server.routes["/away"] = redirect(f"{elsewhere.url}/alice.keys")
        away = _fetch(SshKey.objects.create(user=user, name="away", source=f"{server.url}/away", public_key=ED))
        assert "127.0.0.2 is a loopback address" in away.fetch_error and away.public_key == ED
        assert elsewhere.requests == []  # refused before connecting
    finally:
        elsewhere.close()

    server.routes["/down"] = redirect(f"http://127.0.0.1:{server.port}/alice.keys")
    down = _fetch(SshKey.objects.create(user=user, name="down", source=f"{server.url}/down"))
    assert "only https:// URLs" in down.fetch_error  # no step down to http on the way

    server.routes["/loop"] = redirect("/loop")
    loop = _fetch(SshKey.objects.create(user=user, name="loop", source=f"{server.url}/loop"))
    assert "more than 5 redirects" in loop.fetch_error
    assert server.requests.count("/loop") == 6


@pytest.mark.django_db
def test_the_certificate_must_chain_to_a_trusted_ca(server, user, keys, settings):
    server.routes["/alice.keys"] = Answer(body=keys[0].encode())
    settings.PORTAL_SSH_KEY_CA_FILE = ""  # the system's CAs only: they never signed the test CA
    assert "CERTIFICATE_VERIFY_FAILED" in _fetch(_source(user, server)).fetch_error
    settings.PORTAL_SSH_KEY_CA_FILE = "/nonexistent/ca.pem"
    assert "PORTAL_SSH_KEY_CA_FILE cannot be loaded" in _fetch(SshKey.objects.get(user=user)).fetch_error


@pytest.mark.django_db
def test_a_short_name_is_fetched_from_its_expansion(server, user, keys, monkeypatch):
    pattern = sshkeys.SHORT_NAMES["gh"][1]
    monkeypatch.setitem(sshkeys.SHORT_NAMES, "gh", (f"{server.url}/gh/{{}}.keys", pattern))
    server.routes["/gh/octocat.keys"] = Answer(body=keys[1].encode())
    key = _fetch(SshKey.objects.create(user=user, name="gh", source="gh:octocat"))
    assert key.public_key == keys[1] and server.requests == ["/gh/octocat.keys"]


@pytest.mark.django_db
def test_a_key_removed_or_changed_since_the_fetch_was_queued_is_left_alone(server, user, keys):
    server.routes["/alice.keys"] = Answer(body=keys[0].encode())
    key = _source(user, server)
    SshKey.objects.filter(pk=key.pk).delete()
    ssh_key_fetch(key.pk)  # nothing to do, nothing raised
    assert not SshKey.objects.exists() and server.requests == []


# The account page.

SERVER_SOURCE = "https://127.0.0.1:{port}/alice.keys"


@pytest.mark.django_db
def test_the_form_takes_a_pasted_key_or_a_source_but_not_both_nor_neither(user_client, settings):
    settings.PORTAL_IMPORT_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    r = user_client.post("/account/keys/", {"name": "both", "public_key": ED, "source": "gh:octocat"})
    assert "Paste a key or name a source, not both." in r.content.decode()
    r = user_client.post("/account/keys/", {"name": "neither"})
    assert "Paste a public key, or name a source" in r.content.decode()
    r = user_client.post("/account/keys/", {"name": "bad", "source": "gh:-x"})
    assert "is not a GitHub user name" in r.content.decode()
    r = user_client.post("/account/keys/", {"name": "plain", "source": "http://keys.example/a.keys"})
    assert "Give an https:// URL" in r.content.decode()
    r = user_client.post("/account/keys/", {"name": "metadata", "source": "https://169.254.169.254/keys"})
    assert "169.254.169.254 is a link-local address" in r.content.decode()
    assert not SshKey.objects.exists()


@pytest.mark.django_db
def test_a_source_is_queued_fetched_shown_refreshed_and_offered(
    user_client, user, server, keys, tmp_path, django_capture_on_commit_callbacks
):
    server.routes["/alice.keys"] = Answer(body=keys[0].encode())
    source = SERVER_SOURCE.format(port=server.port)
    with django_capture_on_commit_callbacks(execute=False) as queued:  # saved, the fetch only queued
        r = user_client.post("/account/keys/", {"name": "alice", "source": source})
    assert r.status_code == 302 and len(queued) == 1 and server.requests == []
    key = SshKey.objects.get(user=user)
    assert (key.source, key.public_key, key.fetched) == (source, "", None)
    assert "waiting for the worker to fetch the keys" in user_client.get("/account/").content.decode()
    add = AuditEvent.objects.get(action="ssh_key.add")
    assert add.detail == f"source={source}"

    queued[0]()  # what the commit runs: the task, inline in the unit tests
    page = user_client.get("/account/").content.decode()
    assert "1 key, fetched " in page and describe(keys[0]).fingerprint in page
    assert escape(str(describe(keys[0]))) in page

    server.routes["/alice.keys"] = Answer(body="\n".join(keys).encode())
    with django_capture_on_commit_callbacks(execute=True):
        r = user_client.post(f"/account/keys/{key.pk}/refresh/")
    assert r.status_code == 302
    key.refresh_from_db()
    assert key.public_key.splitlines() == keys
    assert AuditEvent.objects.filter(action="ssh_key.refresh", outcome="success").count() == 1
    page = user_client.get("/account/").content.decode()
    assert "2 keys, fetched " in page and all(describe(k).fingerprint in page for k in keys)

    user_client.post("/account/keys/", {"name": "laptop", "public_key": ED})
    offered = user_client.get("/machines/new/").content.decode()
    assert all(k.split()[1] in offered for k in [*keys, ED])


@pytest.mark.django_db
def test_a_pasted_key_is_not_refreshed_and_shows_its_fingerprint(user_client, user, django_capture_on_commit_callbacks):
    user_client.post("/account/keys/", {"name": "laptop", "public_key": ED})
    key = SshKey.objects.get(user=user)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        r = user_client.post(f"/account/keys/{key.pk}/refresh/", follow=True)
    assert queued == [] and "only keys from a URL or a short name are refreshed" in r.content.decode()
    assert AuditEvent.objects.get(action="ssh_key.refresh").outcome == "refused"
    assert describe(ED).fingerprint in r.content.decode() and "Refresh</button>" not in r.content.decode()


@pytest.mark.django_db
def test_a_failed_fetch_is_shown_with_the_keys_kept(user_client, user, server):
    server.routes["/alice.keys"] = Answer(body=b"<html>rate limited</html>")
    key = _fetch(_source(user, server, old=ED))
    page = user_client.get("/account/").content.decode()
    assert "text-danger" in page and "holds no valid SSH key" in page and describe(ED).fingerprint in page
    assert escape(key.fetch_error) in page


@pytest.mark.django_db
def test_one_user_queues_at_most_ten_fetches_a_minute(
    user_client, user, django_capture_on_commit_callbacks, monkeypatch
):
    with django_capture_on_commit_callbacks(execute=False) as queued:
        for n in range(4):
            user_client.post("/account/keys/", {"name": f"gh{n}", "source": f"gh:user{n}"})
        key = SshKey.objects.get(name="gh0")
        for _ in range(6):
            assert user_client.post(f"/account/keys/{key.pk}/refresh/").status_code == 302
        r = user_client.post(f"/account/keys/{key.pk}/refresh/", follow=True)
        assert "You queued 10 key fetches in the last minute" in r.content.decode()
        r = user_client.post("/account/keys/", {"name": "one-more", "source": "gh:more"})
        assert "You queued 10 key fetches in the last minute" in r.content.decode()
    assert len(queued) == 10 and SshKey.objects.count() == 4
    later = timezone.now() + timedelta(minutes=1, seconds=1)  # audit rows are immutable: move the clock instead
    monkeypatch.setattr(timezone, "now", lambda: later)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        user_client.post(f"/account/keys/{key.pk}/refresh/")
    assert len(queued) == 1

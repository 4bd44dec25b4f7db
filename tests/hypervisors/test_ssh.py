"""The worker's SSH identity, the pinned host keys and the ssh client libvirt runs for qemu+ssh hypervisors
(hypervisors/drivers/ssh.py), and the services and pages around them. No host is contacted: the seams are
get_driver and ssh-keyscan."""

import re
import stat
import subprocess
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.exceptions import ValidationError
from django.urls import reverse

from hypervisors import services
from hypervisors.drivers import ssh
from hypervisors.drivers.base import HypervisorUnavailable
from hypervisors.models import Hypervisor, HypervisorStatus
from hypervisors.validators import validate_libvirt_uri
from tests.factories import HypervisorFactory

URI = "qemu+ssh://root@10.0.0.7/system"
REFUSED = (
    "Cannot recv data: No ED25519 host key is known for 10.0.0.7 and you have requested strict checking.\r\n"
    "Host key verification failed.: Connection reset by peer"
)


def host_key() -> ssh.HostKey:
    public = Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return ssh.parse_host_keys(line)[0]


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    return tmp_path


# --- the worker's key pair ---


def test_the_worker_key_pair_is_made_once_private_0600_in_a_0700_directory(data_dir):
    line = ssh.ensure_identity()
    f = ssh.files()
    assert f.directory == data_dir / "ssh" and stat.S_IMODE(f.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(f.identity.stat().st_mode) == 0o600
    assert f.identity.stat().st_uid == f.directory.stat().st_uid
    assert re.fullmatch(r"ssh-ed25519 AAAA[A-Za-z0-9+/=]+ ansistack-portal-worker", line)
    assert f.public.read_text() == line + "\n"
    assert ssh.ensure_identity() == line  # never replaced
    # OpenSSH reads it: the public key it derives from the private file is the one shown.
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(f.identity)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == line.split()[:2]


def test_a_private_key_others_can_read_is_closed_again():
    ssh.ensure_identity()
    f = ssh.files()
    f.identity.chmod(0o644)
    ssh.ensure_identity()
    assert stat.S_IMODE(f.identity.stat().st_mode) == 0o600


def test_a_key_made_by_another_process_meanwhile_is_used(monkeypatch):
    """Two processes on first need: the second one's O_EXCL create fails and it takes the first one's key."""
    f = ssh.files()
    first = Ed25519PrivateKey.generate()
    pem = first.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    real_open = ssh.os.open

    def racing_open(path, flags, mode=0o777):
        if str(path) == str(f.identity) and flags & ssh.os.O_EXCL:
            with open(path, "wb") as out:
                out.write(pem)
            ssh.os.chmod(path, 0o600)
        return real_open(path, flags, mode)

    monkeypatch.setattr(ssh.os, "open", racing_open)
    line = ssh.ensure_identity()
    expected = first.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert line.split()[:2] == expected.decode().split()


# --- host keys ---


def test_host_keys_parse_from_pub_files_known_hosts_and_keyscan_lines_with_ssh_keygens_fingerprint(tmp_path):
    key = host_key()
    text = f"# comment\n\n{key.line} root@kvm07\n[10.0.0.7]:2222 {key.line}\n10.0.0.7 {key.line}\n"
    assert ssh.parse_host_keys(text) == [key]  # the same key once
    pub = tmp_path / "k.pub"
    pub.write_text(f"{key.line} root@kvm07\n")
    printed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    assert printed.split()[1] == key.fingerprint and key.label == f"ED25519 {key.fingerprint}"


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "ssh-ed25519",
        "ssh-ed25519 not-base64!",
        "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIGQ70hzbHiDP5XJjWWn9OzkBBrU4F+eJFSE1kzR3iV44",  # an ed25519 key called rsa
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    ],
)
def test_anything_else_is_not_a_host_key(text):
    with pytest.raises(ssh.HostKeyError):
        ssh.parse_host_keys(text)


def test_known_hosts_holds_exactly_the_pinned_keys_by_host_and_port():
    a, b = host_key(), host_key()
    path = ssh.write_known_hosts([("10.0.0.7", 22, a), ("kvm08.lab", 2222, b)])
    lines = path.read_text().splitlines()
    assert lines[1:] == sorted([f"10.0.0.7 {a.line}", f"[kvm08.lab]:2222 {b.line}"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ssh.write_known_hosts([])
    assert path.read_text().splitlines()[1:] == []


# --- the ssh client libvirt runs ---


def test_a_qemu_ssh_uri_runs_the_portals_ssh_client_and_others_are_unchanged():
    f = ssh.files()
    assert ssh.libvirt_uri(URI) == f"{URI}?command={f.command}&no_tty=1"
    assert ssh.libvirt_uri(f"{URI}?socket=/run/x") == f"{URI}?socket=/run/x&command={f.command}&no_tty=1"
    for other in ("qemu:///system", "qemu+tls://h/system?pkipath=/p", "test:///default"):
        assert ssh.libvirt_uri(other) == other
    assert stat.S_IMODE(f.command.stat().st_mode) == 0o700
    assert f'-F {f.config} "$@"' in f.command.read_text()
    config = f.config.read_text()
    for line in (
        f"IdentityFile {f.identity}",
        "IdentitiesOnly yes",
        f"UserKnownHostsFile {f.known_hosts}",
        "GlobalKnownHostsFile /dev/null",
        "StrictHostKeyChecking yes",
        "UpdateHostKeys no",
        "BatchMode yes",
        "PasswordAuthentication no",
    ):
        assert f"    {line}\n" in config
    assert f.known_hosts.exists() and f.identity.exists()


def test_openssh_itself_reads_the_portals_config_as_intended():
    """ssh -G prints the options it would use: the portal's, whatever ~/.ssh/config says."""
    ssh.libvirt_uri(URI)
    f = ssh.files()
    out = subprocess.run(
        ["ssh", "-F", str(f.config), "-G", "-o", "BatchMode=yes", "root@10.0.0.7"], capture_output=True, text=True
    ).stdout
    options = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert options["stricthostkeychecking"] == "true"
    assert options["userknownhostsfile"] == str(f.known_hosts) and options["globalknownhostsfile"] == "/dev/null"
    assert options["identityfile"] == str(f.identity) and options["identitiesonly"] == "yes"


def test_a_data_dir_ssh_config_could_misread_is_refused(settings, tmp_path):
    settings.DATA_DIR = tmp_path / "with space"
    with pytest.raises(Exception, match="letters, digits"):
        ssh.files()


def test_a_host_key_refusal_is_told_from_other_errors():
    assert ssh.host_key_refused(REFUSED)
    assert not ssh.host_key_refused("cannot reach 10.0.0.7:22: No route to host")
    assert not ssh.host_key_refused("Cannot recv data: root@10.0.0.7: Permission denied (publickey).")


# --- URI validation ---


@pytest.mark.parametrize("name", ["no_verify", "NO_VERIFY", "No_Verify"])
def test_a_qemu_ssh_uri_asking_for_no_verify_is_refused_with_why(name):
    with pytest.raises(ValidationError) as e:
        validate_libvirt_uri(f"{URI}?{name}=1")
    message = e.value.messages[0]
    assert f"'{name}' is not allowed" in message and "accept any SSH host key" in message
    assert "pins the host key" in message


def test_a_qemu_ssh_uri_naming_its_own_ssh_command_is_refused():
    with pytest.raises(ValidationError, match="names a program the worker would run"):
        validate_libvirt_uri(f"{URI}?command=/usr/bin/ssh")


# --- services: refusal, trust, paste ---


@pytest.fixture
def ssh_hv(db):
    return HypervisorFactory(name="kvm07", uri=URI, console_address="10.0.0.7", status=HypervisorStatus.PENDING)


@pytest.fixture
def no_driver():
    """No hypervisor is contacted: get_driver (the seam the services call) is a fake."""
    with mock.patch("hypervisors.services.get_driver", autospec=True) as driver:
        yield driver


@pytest.fixture
def refused(no_driver):
    """The host's key is refused by ssh; ssh-keyscan finds `offered`."""
    no_driver.return_value.host_info.side_effect = HypervisorUnavailable(REFUSED)
    offered = [host_key()]
    with mock.patch("hypervisors.drivers.ssh.scan_host_keys", autospec=True, return_value=offered) as scan:
        yield offered, scan


def test_an_unknown_host_key_is_refused_with_the_key_the_host_offers(ssh_hv, refused):
    offered, scan = refused
    assert services.hypervisor_sync(ssh_hv.pk) == HypervisorStatus.DOWN
    hv = Hypervisor.objects.get(pk=ssh_hv.pk)
    assert "is not trusted yet" in hv.status_error and offered[0].label in hv.status_error
    assert hv.offered_host_keys == offered and hv.pinned_host_keys == []
    scan.assert_called_once_with("10.0.0.7", 22)


def test_a_changed_host_key_is_refused_and_the_pinned_one_stays(ssh_hv, refused):
    offered, _ = refused
    pinned = host_key()
    Hypervisor.objects.filter(pk=ssh_hv.pk).update(ssh_host_keys=pinned.line + "\n")
    services.hypervisor_sync(ssh_hv.pk)
    hv = Hypervisor.objects.get(pk=ssh_hv.pk)
    assert "has CHANGED" in hv.status_error and offered[0].label in hv.status_error and pinned.label in hv.status_error
    assert hv.pinned_host_keys == [pinned] and hv.offered_host_keys == offered
    assert ssh.files().known_hosts.read_text().splitlines()[1:] == [f"10.0.0.7 {pinned.line}"]


def test_trusting_pins_exactly_the_offered_keys_staff_saw(ssh_hv, refused, django_capture_on_commit_callbacks):
    offered, _ = refused
    services.hypervisor_sync(ssh_hv.pk)
    hv = Hypervisor.objects.get(pk=ssh_hv.pk)
    with pytest.raises(services.HostKeyNotOffered, match="not the one shown"):
        services.hypervisor_trust_host_keys(hypervisor=hv, fingerprints=["SHA256:other"])
    with django_capture_on_commit_callbacks() as callbacks:
        services.hypervisor_trust_host_keys(hypervisor=hv, fingerprints=[offered[0].fingerprint])
    callbacks[0]()  # the known_hosts rewrite (the next queues the check)
    hv.refresh_from_db()
    assert hv.pinned_host_keys == offered and hv.offered_host_keys == [] and hv.status == HypervisorStatus.PENDING
    assert f"10.0.0.7 {offered[0].line}" in ssh.files().known_hosts.read_text()
    with pytest.raises(services.HostKeyNotOffered, match="nothing to trust"):
        services.hypervisor_trust_host_keys(hypervisor=hv, fingerprints=[offered[0].fingerprint])


def test_pasted_host_keys_are_checked_and_kept_without_comments(ssh_hv, no_driver):
    key = host_key()
    hv = services.hypervisor_update(hypervisor=ssh_hv, ssh_host_keys=f"{key.line} root@kvm07\n")
    assert hv.ssh_host_keys == key.line + "\n"
    with pytest.raises(ValidationError) as e:
        services.hypervisor_update(hypervisor=hv, ssh_host_keys="ssh-ed25519 garbage")
    assert "ssh_host_keys" in e.value.message_dict


def test_a_new_host_in_the_uri_forgets_the_pinned_keys(ssh_hv, no_driver):
    Hypervisor.objects.filter(pk=ssh_hv.pk).update(ssh_host_keys=host_key().line + "\n")
    ssh_hv.refresh_from_db()
    hv = services.hypervisor_update(hypervisor=ssh_hv, console_address="10.0.0.8")
    assert hv.pinned_host_keys  # same host: kept
    hv = services.hypervisor_update(hypervisor=hv, uri="qemu+ssh://root@10.0.0.8/system")
    assert Hypervisor.objects.get(pk=hv.pk).ssh_host_keys == ""


# --- pages ---


def test_the_page_shows_staff_the_worker_key_and_the_offered_key_to_trust(staff_client, user_client, ssh_hv, refused):
    offered, _ = refused
    services.hypervisor_sync(ssh_hv.pk)
    page = staff_client.get(reverse("hypervisors:detail", args=[ssh_hv.pk])).content.decode()
    assert ssh.ensure_identity() in page and "~root/.ssh/authorized_keys" in page
    assert offered[0].fingerprint in page and "Trust this host key" in page
    other = user_client.get(reverse("hypervisors:detail", args=[ssh_hv.pk])).content.decode()
    assert "Trust this host key" not in other and "ansistack-portal-worker" not in other
    tls = Hypervisor.objects.create(name="tls", uri="qemu+tls://10.0.0.9/system", console_address="10.0.0.9")
    assert "authorized_keys" not in staff_client.get(reverse("hypervisors:detail", args=[tls.pk])).content.decode()


def test_the_trust_view_is_staff_only_post_only_and_pins(client, staff_client, user_client, ssh_hv, refused):
    offered, _ = refused
    services.hypervisor_sync(ssh_hv.pk)
    url = reverse("hypervisors:trust-host-key", args=[ssh_hv.pk])
    data = {"fingerprint": [offered[0].fingerprint]}
    assert client.post(url, data)["Location"].startswith("/login/")
    assert user_client.post(url, data).status_code == 403
    assert staff_client.get(url).status_code == 405
    assert Hypervisor.objects.get(pk=ssh_hv.pk).pinned_host_keys == []
    r = staff_client.post(url, data)
    assert r.status_code == 302 and Hypervisor.objects.get(pk=ssh_hv.pk).pinned_host_keys == offered

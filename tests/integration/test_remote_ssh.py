"""A remote hypervisor reached over qemu+ssh://, for real: a libvirtd and an sshd in their own network namespace
(tests/integration/remote_ssh.py), driven by the real Huey worker with the portal's own SSH identity. Its host
key is pinned: unknown, the worker refuses to log in and the page shows the key the host offers until staff
trust it; changed, the worker refuses again. Trusted, the host comes online with its own name and pool, an
image machine is provisioned there (the image copied into its pool by libvirt's upload stream over SSH), the
reconcile follows it, and an outage of its link is noticed and recovered."""

import hashlib
import subprocess
import time

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from hypervisors import services as hv_services
from hypervisors.drivers import ssh
from hypervisors.models import Hypervisor, HypervisorStatus, ImageCopy
from machines import services
from machines.models import Machine
from machines.tasks import machines_reconcile_task
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration

DOWN_BOUND = 45  # s: the next sync (every 20 s) plus libvirt's keepalive (5 s x 3) over the silent link
UP_BOUND = 30  # s: the next sync after the link is back


def status_of(pk: int, *wanted: str):
    hv = Hypervisor.objects.get(pk=pk)
    return hv if hv.status in wanted else None


def staff_client() -> Client:
    users = get_user_model().objects
    staff = users.filter(username="hv-staff").first() or users.create_user("hv-staff", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    return client


def register_refused(remote) -> Hypervisor:
    """The host registered by its plain qemu+ssh URI, as staff would: down, its host key not trusted."""
    remote.drop_sessions()  # no connection of an earlier test's lives on in the worker
    hv = hv_services.hypervisor_create(name="remote-ssh", uri=remote.uri, console_address=remote.ip)
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE, HypervisorStatus.DOWN), 30)
    assert hv.status == HypervisorStatus.DOWN, "online with a host key nobody trusted"
    return hv


def trust(client: Client, hv: Hypervisor, fingerprint: str) -> Hypervisor:
    """Staff press "Trust this host key" for the fingerprint the page shows; the host comes online."""
    started = time.monotonic()
    r = client.post(reverse("hypervisors:trust-host-key", args=[hv.pk]), {"fingerprint": [fingerprint]})
    assert r.status_code == 302
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE, HypervisorStatus.DOWN), 30)
    assert hv.status == HypervisorStatus.ONLINE, hv.status_error
    print(f"remote SSH hypervisor online {time.monotonic() - started:.2f} s after its host key was trusted")
    return hv


def register(remote) -> Hypervisor:
    hv = register_refused(remote)
    return trust(staff_client(), hv, remote.host_key_fingerprint())


def worker_ssh_peers(remote) -> list[str]:
    """ssh client processes holding a connection to the host's port 22 (libvirt's transport)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dst", f"{remote.ip}:22"], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if '(("ssh",' in line]


def test_an_unknown_host_key_is_refused_until_staff_trust_it_then_the_host_comes_online(worker, remote_ssh_host):
    remote = remote_ssh_host
    print(f"namespace sshd and libvirtd answering {remote.started_in:.2f} s after the start")
    log_start = len(remote.log_tail(10_000))
    hv = register_refused(remote)

    # The status says why, with the key the host offers, which is the host's own.
    fingerprint = remote.host_key_fingerprint()
    assert "SSH host key of" in hv.status_error and "is not trusted yet" in hv.status_error, hv.status_error
    assert f"ED25519 {fingerprint}" in hv.status_error
    assert [k.fingerprint for k in hv.offered_host_keys] == [fingerprint] and hv.pinned_host_keys == []
    print(f"refused: {hv.status_error}")
    # The worker never got as far as offering its key: sshd saw no login.
    assert "Accepted publickey" not in remote.log_tail(10_000)[log_start:]

    # The page shows staff the worker's key to install, and the offered key with the button.
    client = staff_client()
    page = client.get(reverse("hypervisors:detail", args=[hv.pk])).content.decode()
    assert ssh.ensure_identity() in page and "authorized_keys" in page
    assert fingerprint in page and "Trust this host key" in page

    # A stale or forged fingerprint pins nothing.
    r = client.post(reverse("hypervisors:trust-host-key", args=[hv.pk]), {"fingerprint": ["SHA256:forged"]})
    assert r.status_code == 302 and Hypervisor.objects.get(pk=hv.pk).pinned_host_keys == []

    hv = trust(client, hv, fingerprint)
    assert [k.line for k in hv.pinned_host_keys] == [remote.host_key()] and hv.offered_host_keys == []
    assert f"{remote.ip} {remote.host_key()}\n" in (ssh.files().known_hosts).read_text()
    assert hv.hostname == "remote-ssh" and hv.arch == "x86_64" and hv.cpus and hv.memory_mib
    assert hv.domain_type == "qemu" and hv.libvirt_version and hv.hypervisor_version
    pools = {p["name"]: p for p in hv.pools}
    assert set(pools) == {"default"} and pools["default"]["path"] == str(remote.pool_path)
    assert hv.networks == [] and hv.unmanaged_domains == []
    assert "Accepted publickey for root" in remote.log_tail(10_000)[log_start:]
    assert worker_ssh_peers(remote), "no ssh process holds a connection to the host"


def test_a_changed_host_key_is_refused_until_trusted_again(worker, remote_ssh_host):
    remote = remote_ssh_host
    hv = register(remote)
    old = remote.host_key_fingerprint()

    # The host is reinstalled (or another machine answers at its address): a new key, its sessions gone.
    remote.rotate_host_key()
    remote.drop_sessions()
    new = remote.host_key_fingerprint()
    hv_services.hypervisor_request_sync(hypervisor=hv)
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.DOWN), 30, message="a changed host key was accepted")
    print(f"refused: {hv.status_error}")
    assert "has CHANGED" in hv.status_error and new in hv.status_error and old in hv.status_error
    assert [k.fingerprint for k in hv.pinned_host_keys] == [old]  # nothing replaced it by itself
    assert [k.fingerprint for k in hv.offered_host_keys] == [new]
    time.sleep(settings.PORTAL_SYNC_INTERVAL + 2)  # later syncs change nothing
    hv = Hypervisor.objects.get(pk=hv.pk)
    assert hv.status == HypervisorStatus.DOWN and [k.fingerprint for k in hv.pinned_host_keys] == [old]

    page = staff_client().get(reverse("hypervisors:detail", args=[hv.pk])).content.decode()
    assert "The host now offers another key" in page and new in page
    hv = trust(staff_client(), hv, new)
    assert [k.fingerprint for k in hv.pinned_host_keys] == [new]


def test_an_image_machine_is_provisioned_over_ssh_and_the_reconcile_follows_it(worker, remote_ssh_host, tiny_image):
    remote = remote_ssh_host
    hv = register(remote)
    owner = UserFactory(username="remote-owner", is_staff=True)  # staff: the user-mode NIC (no tenant network there)
    started = time.monotonic()
    machine = services.machine_create(
        owner=owner,
        hypervisor=hv,
        name="remote1",
        image=tiny_image,
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    print(f"image machine active on the SSH host after {time.monotonic() - started:.1f} s")

    assert remote.virsh_local("domstate", str(machine.uuid)).strip() == "running"
    assert remote.virsh_local("domdisplay", str(machine.uuid)).startswith(f"vnc://{remote.ip}:")
    # The image came over libvirt's upload stream through SSH byte for byte.
    copy = ImageCopy.objects.get(image=tiny_image, hypervisor=hv)
    assert copy.pool == "default" and copy.path.startswith(f"{remote.pool_path}/")
    with open(copy.path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == tiny_image.sha256
    volumes = remote.virsh_local("vol-list", "default")
    assert machine.disk_volume in volumes and machine.seed_volume in volumes

    # Powered off behind the portal's back, on the host: the worker's reconcile notices.
    remote.virsh_local("destroy", str(machine.uuid))
    noticed = time.monotonic()
    machines_reconcile_task()
    wait_for(
        lambda: Machine.objects.get(pk=machine.pk).power_state == "off", 60, message="the reconcile did not see it"
    )
    print(f"the reconcile saw the machine off {time.monotonic() - noticed:.1f} s after it was destroyed")

    services.machine_delete(machine=machine, actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60, message="delete did not finish")
    assert str(machine.uuid) not in remote.virsh_local("list", "--all", "--uuid")
    assert machine.disk_volume not in remote.virsh_local("vol-list", "default")


def test_an_outage_of_the_link_is_noticed_and_the_host_comes_back(worker, remote_ssh_host):
    remote = remote_ssh_host
    hv = register(remote)
    remote.link_down()
    try:
        outage = time.monotonic()
        hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.DOWN), DOWN_BOUND + 15, message="outage not noticed")
        noticed = time.monotonic() - outage
        print(f"outage noticed after {noticed:.1f} s: {hv.status_error}")
        assert noticed <= DOWN_BOUND
        assert hv.hostname == "remote-ssh" and hv.pools  # the last known capabilities stay on the page
        assert "host key" not in hv.status_error  # an outage is not mistaken for a key problem
    finally:
        remote.link_up()
    back = time.monotonic()
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE), UP_BOUND + 15, message="did not come back")
    recovered = time.monotonic() - back
    print(f"recovered {recovered:.1f} s after the link came back")
    assert recovered <= UP_BOUND
    assert hv.status_error == "" and hv.hostname == "remote-ssh"


def test_a_network_machine_on_the_ssh_host_is_powered_through_its_bmc(worker, remote_ssh_host, bmc_server):
    """virtualbmc opens the machine's qemu+ssh URI itself: with the portal's ssh client, key and pinned host key
    (the BMC server gives it the same URI the worker opens), never the user's own ssh set-up."""
    from tests.integration.test_network_bmc import ipmi

    remote = remote_ssh_host
    hv = register(remote)
    owner = UserFactory(username="ssh-metal", is_staff=True)
    machine = services.machine_create(
        owner=owner,
        hypervisor=hv,
        name="sshmetal",
        deploy_type="network",
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 60)
    assert machine.status == "active", machine.status_message
    creds = services.machine_bmc_reveal(machine=machine, actor=owner)
    wait_for(lambda: Machine.objects.get(pk=machine.pk).bmc_listening, 15, message="the BMC never listened")
    uuid = str(machine.uuid)
    assert "Chassis Power is off" in ipmi(creds, "power", "status").stdout
    started = time.monotonic()
    assert ipmi(creds, "power", "on").returncode == 0
    wait_for(lambda: remote.virsh_local("domstate", uuid).strip() == "running", 30)
    print(f"IPMI power on over qemu+ssh: running after {time.monotonic() - started:.1f} s")
    assert ipmi(creds, "chassis", "bootdev", "pxe").returncode == 0
    assert ipmi(creds, "power", "off").returncode == 0
    wait_for(lambda: remote.virsh_local("domstate", uuid).strip() == "shut off", 30)


def test_an_iso_machines_consoles_on_the_ssh_host_reach_the_client_through_the_proxy(
    worker, remote_ssh_host, tiny_iso, console_proxy
):
    """The same console model as over TLS: the VNC server listens on the host's console address (never its
    loopback), the proxy sets its one-time password through libvirt over SSH and dials it; the serial port is a
    libvirt console stream over SSH."""
    from tests.integration.test_console_auth import rfb_session
    from tests.integration.test_iso_console import WsClient, serial_token, token_for
    from tests.integration.test_remote_consoles import create

    remote = remote_ssh_host
    hv = register(remote)
    machine = create(hv, UserFactory(username="ssh-installer", is_staff=True), "sshiso", "iso", tiny_iso)
    assert remote.virsh_local("domdisplay", str(machine.uuid)).startswith(f"vnc://{remote.ip}:")
    from tests.conftest import serial_log

    serial_log(machine.pk, "TINY-GUEST ready", timeout=120)
    started = time.monotonic()
    ws, width, height, name = rfb_session(console_proxy, machine, token_for(machine), 8)
    assert name == f"QEMU ({machine.domain_name})".encode() and width >= 640
    ws.close()
    print(f"console on the SSH host: ServerInit {time.monotonic() - started:.2f} s after the request")
    serial = WsClient(console_proxy, f"/serial/{machine.pk}?token={serial_token(machine)}")
    try:
        assert serial.status == 101
        started = time.monotonic()
        serial.send(b"\r")
        assert b"# " in serial.read_until(b"# "), serial.data[-300:]
        serial.send(b"echo SSH_$((6*7))\r")
        assert b"SSH_42" in serial.read_until(b"SSH_42"), serial.data[-300:]
        print(f"serial over SSH: a shell round trip {time.monotonic() - started:.2f} s after the upgrade")
    finally:
        serial.close()

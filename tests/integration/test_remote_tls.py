"""A remote hypervisor reached over qemu+tls://, for real: a libvirtd in its own network namespace
(tests/integration/remote_host.py) with certificates from `manage.py lab_certs`, driven by the real
Huey worker. It comes online with its own host name and pool, an outage of its link is noticed and
recovered by the periodic sync, an image machine is provisioned there through the TLS connection, and
the port only talks TLS to a client with a certificate from the lab's CA."""

import contextlib
import hashlib
import socket
import ssl
import subprocess
import time

import pytest

from hypervisors import services as hv_services
from hypervisors.management.commands.lab_certs import make_lab_certs
from hypervisors.models import Hypervisor, HypervisorStatus, ImageCopy
from machines import services
from machines.models import Machine
from machines.tasks import machines_reconcile_task
from tests.conftest import wait_for
from tests.factories import UserFactory
from tests.integration.remote_host import ALLOWED_CLIENT_DN

pytestmark = pytest.mark.integration

DOWN_BOUND = 45  # s: the next sync (every 20 s) plus libvirt's keepalive (5 s x 3) on a host that went silent
UP_BOUND = 30  # s: the next sync after the link is back


def status_of(pk: int, *wanted: str):
    hv = Hypervisor.objects.get(pk=pk)
    return hv if hv.status in wanted else None


def register(remote) -> Hypervisor:
    """The remote host registered by its TLS URI, as staff would, and online."""
    started = time.monotonic()
    # Consoles listen on its address on the link, which the portal's machine reaches (never its loopback).
    hv = hv_services.hypervisor_create(name="remote-tls", uri=remote.uri, console_address=remote.ip)
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE, HypervisorStatus.DOWN), 30)
    assert hv.status == HypervisorStatus.ONLINE, hv.status_error
    print(f"remote TLS hypervisor online after {time.monotonic() - started:.2f} s")
    return hv


def worker_tls_peers(worker_pid: int, remote) -> list[str]:
    """The worker's TCP connections to the remote host's TLS port (ss -p names the owning process)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dst", f"{remote.ip}:16514"], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if f"pid={worker_pid}," in line]


@contextlib.contextmanager
def tls_session(address: str, ctx: ssl.SSLContext):
    with (
        socket.create_connection((address, 16514), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=address) as tls,
    ):
        yield tls


def read_until_closed(tls: ssl.SSLSocket) -> bytes:
    """What the server sends before it closes (an alert or a reset counts as closing)."""
    data = b""
    try:
        while chunk := tls.recv(4096):
            data += chunk
    except (ssl.SSLError, ConnectionError) as e:
        print(f"closed by the server: {e}")
    return data


def test_lab_certs_prints_the_uri_the_portal_dials_and_the_hosts_libvirtd_is_untouched(libvirtd, remote_tls_host):
    assert f"URI:    {remote_tls_host.uri}\n" in remote_tls_host.lab_certs_output
    # The namespace's libvirtd runs beside the host's, which still answers on its own socket as itself.
    host = subprocess.run(["virsh", "-c", libvirtd, "hostname"], capture_output=True, text=True, timeout=60)
    assert host.returncode == 0 and host.stdout.strip() == socket.gethostname(), host.stderr
    print(
        f"namespace libvirtd answering over TLS {remote_tls_host.started_in:.2f} s after the start "
        f"(lab_certs {remote_tls_host.certs_in:.2f} s)"
    )


def test_the_remote_host_comes_online_over_tls_with_its_own_name_and_pool(worker, remote_tls_host):
    hv = register(remote_tls_host)
    assert hv.hostname == "remote-tls" != socket.gethostname()  # the namespace's own UTS name
    assert hv.arch == "x86_64" and hv.cpus and hv.memory_mib
    assert hv.domain_type == "qemu" and "qemu" in hv.domain_types
    assert hv.libvirt_version and hv.hypervisor_version
    pools = {p["name"]: p for p in hv.pools}
    assert set(pools) == {"default"}  # the namespace's pool, not the host's
    assert pools["default"]["active"] and pools["default"]["path"] == str(remote_tls_host.pool_path)
    assert hv.networks == [] and hv.unmanaged_domains == []  # its private /etc/libvirt holds nothing else
    # The worker itself holds a TCP connection to the namespace's TLS port.
    assert worker_tls_peers(worker.pid, remote_tls_host), "the worker has no connection to the TLS port"


def test_an_outage_of_the_link_is_noticed_and_the_host_comes_back(worker, remote_tls_host):
    hv = register(remote_tls_host)
    remote_tls_host.link_down()
    try:
        outage = time.monotonic()
        hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.DOWN), DOWN_BOUND + 15, message="outage not noticed")
        noticed = time.monotonic() - outage
        print(f"outage noticed after {noticed:.1f} s: {hv.status_error}")
        assert noticed <= DOWN_BOUND
        assert hv.hostname == "remote-tls" and hv.pools  # the last known capabilities stay on the page
    finally:
        remote_tls_host.link_up()
    back = time.monotonic()
    hv = wait_for(lambda: status_of(hv.pk, HypervisorStatus.ONLINE), UP_BOUND + 15, message="did not come back")
    recovered = time.monotonic() - back
    print(f"recovered {recovered:.1f} s after the link came back")
    assert recovered <= UP_BOUND
    assert hv.status_error == "" and hv.hostname == "remote-tls"


def test_an_image_machine_is_provisioned_on_the_remote_host(worker, remote_tls_host, tiny_image):
    hv = register(remote_tls_host)
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
    print(f"image machine active on the remote host after {time.monotonic() - started:.1f} s")

    # On the hypervisor itself: the domain runs, and the image came over the TLS stream byte for byte.
    assert remote_tls_host.virsh_local("domstate", str(machine.uuid)).strip() == "running"
    # Its console listens on the hypervisor's address on the link, where the console proxy reaches it.
    assert remote_tls_host.virsh_local("domdisplay", str(machine.uuid)).startswith(f"vnc://{remote_tls_host.ip}:")
    copy = ImageCopy.objects.get(image=tiny_image, hypervisor=hv)
    assert copy.pool == "default" and copy.path.startswith(f"{remote_tls_host.pool_path}/")
    with open(copy.path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == tiny_image.sha256
    volumes = remote_tls_host.virsh_local("vol-list", "default")
    assert machine.disk_volume in volumes and machine.seed_volume in volumes

    services.machine_delete(machine=machine, actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60, message="delete did not finish")
    assert str(machine.uuid) not in remote_tls_host.virsh_local("list", "--all", "--uuid")
    assert machine.disk_volume not in remote_tls_host.virsh_local("vol-list", "default")


def test_the_port_speaks_only_tls_and_only_to_the_labs_clients(remote_tls_host, tmp_path):
    remote, client = remote_tls_host, remote_tls_host.client_pki

    # A TLS handshake, whose server certificate verifies against the lab's CA for the address dialled;
    # with the lab's client certificate libvirtd accepts (its one-byte verdict after the handshake, 1)
    # and then waits for libvirt's protocol.
    ctx = ssl.create_default_context(cafile=str(client / "cacert.pem"))
    ctx.load_cert_chain(str(client / "clientcert.pem"), str(client / "clientkey.pem"))
    with tls_session(remote.ip, ctx) as tls:
        subject = dict(item for rdn in tls.getpeercert()["subject"] for item in rdn)
        assert subject["commonName"] == remote.ip and tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.recv(1) == b"\x01"
        tls.settimeout(1)
        with pytest.raises(TimeoutError):
            tls.recv(4096)

    # Without a client certificate libvirtd ends the session at once, without a verdict, and says why.
    bare = ssl.create_default_context(cafile=str(client / "cacert.pem"))
    with tls_session(remote.ip, bare) as tls:
        assert read_until_closed(tls) == b""
    assert "Unable to verify TLS peer: No certificate was found" in wait_for(
        lambda: (tail := remote.log_tail(10)) and "No certificate was found" in tail and tail, 10
    )

    # A certificate from another lab's CA (the client trusting the right server) is refused by the server.
    other = make_lab_certs(tmp_path / "other", server_ip=remote.ip)
    foreign = ssl.create_default_context(cafile=str(client / "cacert.pem"))
    foreign.load_cert_chain(str(other.client_dir / "clientcert.pem"), str(other.client_dir / "clientkey.pem"))
    with tls_session(remote.ip, foreign) as tls:
        assert read_until_closed(tls) == b""
    wait_for(lambda: "The certificate hasn't got a known issuer" in remote.log_tail(10), 10)

    # libvirt's own client. Another lab's files: the client does not trust the server. No files: it does
    # not even dial (libvirt also checks its own certificate against its CA before it connects).
    empty = tmp_path / "empty"
    empty.mkdir()
    for pkipath, expected in (
        (other.client_dir, "Failed to verify peer's certificate"),
        (empty, "Cannot read CA certificate"),
    ):
        r = subprocess.run(
            ["virsh", "-c", f"qemu+tls://{remote.ip}/system?pkipath={pkipath}", "uri"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and expected in r.stderr, r.stderr
        print(f"{pkipath.name}: {expected}")

    # A certificate from the lab's own CA for another client (an operator's, say) passes TLS but not libvirtd's
    # tls_allowed_dn_list, which names the worker's certificate alone (as lab_certs prints it).
    intruder = same_ca_client(remote, tmp_path / "intruder", "intruder")
    r = subprocess.run(
        ["virsh", "-c", f"qemu+tls://{remote.ip}/system?pkipath={intruder}", "uri"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0, r.stdout
    wait_for(lambda: "is not on the list of allowed clients" in remote.log_tail(20), 10)
    assert f'tls_allowed_dn_list = ["{ALLOWED_CLIENT_DN}"]' in remote.lab_certs_output

    # And nothing listens in the clear.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((remote.ip, 16509), timeout=10)


def same_ca_client(remote, directory, name: str):
    """A client certificate signed by the lab's CA for another common name, laid out for libvirt's pkipath."""
    import datetime
    import shutil

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_dir = remote.certs / "ca"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "cacert.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "cakey.pem").read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AnsiStack Portal lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    shutil.copy(ca_dir / "cacert.pem", directory / "cacert.pem")
    (directory / "clientcert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "clientkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return directory


def test_a_provision_outlives_its_hypervisors_libvirtd_stopped_and_started_again(worker, remote_tls_host, tiny_image):
    """libvirtd stopped as the image machine's provision begins: the attempt sees the hypervisor unavailable
    and retries after its backoff; started again, the same attempt's retry finishes with exactly one domain
    and the machine's own volumes (nothing from the interrupted try left beside them)."""
    remote = remote_tls_host
    hv = register(remote)
    owner = UserFactory(username="restart-owner", is_staff=True)  # staff: the user-mode NIC
    machine = services.machine_create(
        owner=owner,
        hypervisor=hv,
        name="restarted",
        image=tiny_image,
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    wait_for(
        lambda: (m := Machine.objects.get(pk=machine.pk)).attempt_id and m.status == "provisioning",
        60,
        interval=0.005,
        message="the provision never began",
    )
    remote.stop_libvirtd()
    stopped = time.monotonic()
    retry = wait_for(
        lambda: Machine.objects.get(pk=machine.pk).events.filter(step="retry").first(),
        60,
        message="the provision did not notice libvirtd gone",
    )
    print(f"provision noticed libvirtd gone {time.monotonic() - stopped:.1f} s after the stop: {retry.message}")
    time.sleep(3)
    remote.start_libvirtd()
    print(f"libvirtd answered again {time.monotonic() - stopped:.1f} s after the stop")
    done = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status != "provisioning" and m, 180, interval=1)
    print(f"machine {done.status} {time.monotonic() - stopped:.1f} s after the stop")
    assert done.status == "active", done.status_message
    uuid = str(machine.uuid)
    assert remote.virsh_local("domstate", uuid).strip() == "running"
    assert remote.virsh_local("list", "--all", "--uuid").split().count(uuid) == 1
    remote.virsh_local("pool-refresh", "default")
    mine = {line.split()[0] for line in remote.virsh_local("vol-list", "default").splitlines()[2:] if uuid in line}
    assert mine == set(done.volumes), mine
    # Powered off behind the portal's back on the host: the worker's reconcile sees it over TLS.
    remote.virsh_local("destroy", uuid)
    machines_reconcile_task()
    wait_for(lambda: Machine.objects.get(pk=machine.pk).power_state == "off", 60, message="the reconcile missed it")
    services.machine_delete(machine=done, actor=owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)

import socket
import threading

import pytest

from machines import services
from machines.models import Machine
from tests.conftest import wait_for
from tests.factories import UserFactory

LIBVIRT_SOCK = "/var/run/libvirt/libvirt-sock"


class TcpToUnixProxy:
    """Forwards TCP on 127.0.0.1:port to libvirtd's UNIX socket: a 'remote' hypervisor
    the test can cut off (stop) and bring back (start) on the same port."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener:
            self._listener.close()
            self._listener = None
        with self._lock:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            with self._lock:
                self._open.update({client, upstream})
            for a, b in [(client, upstream), (upstream, client)]:
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def libvirt_tcp_proxy(libvirtd):
    proxy = TcpToUnixProxy(LIBVIRT_SOCK)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def iso_machine(worker, local, tiny_iso):
    """The tiny installer ISO running on `local`: the console tests' machine."""
    owner = UserFactory(username="installer", password="correct-horse-battery")
    machine = services.machine_create(
        owner=owner, hypervisor=local, name="iso1", deploy_type="iso", image=tiny_iso, memory_mib=256, disk_gib=1
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    return machine


@pytest.fixture(scope="session")
def remote_tls_host():
    """A second hypervisor host reached only over qemu+tls:// (tests/integration/remote_host.py): a libvirtd
    in its own network, mount, UTS and PID namespaces, with certificates from `manage.py lab_certs`."""
    from tests.conftest import ARTIFACTS
    from tests.integration.remote_host import RemoteTlsHost

    with RemoteTlsHost.start(log_dir=ARTIFACTS) as host:
        yield host


@pytest.fixture(scope="session")
def remote_ssh_host():
    """A hypervisor host reached only over qemu+ssh:// (tests/integration/remote_ssh.py): a libvirtd and an sshd
    in their own network, mount, UTS and PID namespaces; its sshd lets the worker's key in (the portal's own,
    from its data directory, which the test run shares with the worker)."""
    from hypervisors.drivers.ssh import ensure_identity
    from tests.conftest import ARTIFACTS
    from tests.integration.remote_ssh import RemoteSshHost

    with RemoteSshHost.start(log_dir=ARTIFACTS) as host:
        host.authorize(ensure_identity())
        yield host

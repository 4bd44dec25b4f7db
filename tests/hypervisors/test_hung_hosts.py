"""A hypervisor that accepts TCP and never answers (issue 13): the reachability check says so within its
timeout in the calling thread, and an open abandoned at its timeout leaves no thread or socket behind."""

import socket
import threading
import time

import pytest

from hypervisors.drivers import connections
from hypervisors.drivers.base import HypervisorUnavailable
from hypervisors.drivers.libvirt_driver import LibvirtDriver


@pytest.fixture
def silent():
    """A port that accepts connections and never says a word; yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for s in held:
        s.close()
    listener.close()


def opening() -> int:
    return sum(t.name == "libvirt-open" for t in threading.enumerate())


@pytest.mark.parametrize("transport", ["tcp", "tls", "ssh"])
def test_a_host_that_accepts_and_never_answers_fails_the_check_within_its_timeout(silent, transport):
    start = time.monotonic()
    with pytest.raises(HypervisorUnavailable, match="accepted the connection but did not answer"):
        connections.check_reachable(f"qemu+{transport}://127.0.0.1:{silent}/system", timeout=0.5)
    assert time.monotonic() - start < 1.0
    assert not connections._sockets_to("127.0.0.1", silent)


def test_a_host_that_answers_libvirts_first_call_passes_the_check():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    asked = []

    def answer():
        peer, _ = listener.accept()
        asked.append(peer.recv(28))
        peer.sendall(b"\x00\x00\x00\x1c")  # the start of a reply
        peer.close()

    threading.Thread(target=answer, daemon=True).start()
    connections.check_reachable(f"qemu+tcp://127.0.0.1:{listener.getsockname()[1]}/system", timeout=2)
    listener.close()
    assert asked and asked[0][12:16] == (66).to_bytes(4, "big")  # REMOTE_PROC_AUTH_LIST


def test_an_open_abandoned_at_its_timeout_ends_its_thread_and_its_socket(silent):
    before = opening()
    start = time.monotonic()
    with pytest.raises(HypervisorUnavailable, match="did not answer within 0.5 s"):
        connections._open(f"qemu+tcp://127.0.0.1:{silent}/system", 0.5)  # past the check: libvirt's own wait
    assert time.monotonic() - start < 2.0
    time.sleep(0.2)
    assert opening() == before
    assert not connections._sockets_to("127.0.0.1", silent)


def test_the_driver_on_a_silent_host_is_unavailable_at_once_and_leaves_nothing(silent):
    before = opening()
    driver = LibvirtDriver(f"qemu+tcp://127.0.0.1:{silent}/system", connect_timeout=0.5)
    for _ in range(3):
        with pytest.raises(HypervisorUnavailable):
            driver.domains_observed()
    assert opening() == before and not connections._sockets_to("127.0.0.1", silent)

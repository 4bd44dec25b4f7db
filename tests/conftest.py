import functools
import gc
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from huey.contrib.djhuey import HUEY

from hypervisors.drivers import connections
from portal.models import Heartbeat
from portal.processes import stop_groups
from portal.queue import WORKER
from tests.factories import UserFactory
from tests.fakes import FakeBmc, FakeHost
from tests.images import test_images


@pytest.fixture(autouse=True, scope="session")
def huey_immediate():
    """Unit tests run tasks inline; integration tests switch to a real consumer (tests/integration)."""
    HUEY.immediate = True
    yield
    HUEY.immediate = False


@pytest.fixture(autouse=True)
def plain_static_storage(settings):
    # Unit tests render templates without running collectstatic first.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def test_hv_state():
    """Keep libvirt's test:///default state for one test, then reset it.

    The test driver's state lives while any connection to it stays open. The driver caches one per thread:
    this thread's is closed here, and so are those of the console proxy's long-lived threads for the URI
    (tests/machines/test_console_latency.py opens them), whose connections would otherwise keep one test's
    domains for the next.
    """
    _close_test_host()
    yield
    _close_test_host()


def _close_test_host(uri: str = "test:///default") -> None:
    from machines import console_proxy

    with console_proxy._hypervisor_pools_lock:
        pool = console_proxy._hypervisor_pools.pop(uri, None)
    if pool is not None:
        pool.shutdown(wait=True)  # its threads end, and with them their cached connections
        gc.collect()  # a virConnect closes when it is collected
    connections.drop_connection(uri)


# Where the portal asks for a driver (each imports get_driver by name, so each is patched).
FAKE_DRIVER_SEAMS = (
    "machines.services.adoption",
    "machines.services.bmcs",
    "machines.services.changes",
    "machines.services.devices",
    "machines.services.lifecycle",
    "machines.services.observation",
    "machines.services.operations",
    "machines.services.snapshots",
    "machines.services.migration",
    "machines.services.sweeper",
    "machines.console_proxy",
)


@pytest.fixture
def host(monkeypatch):
    """An in-memory hypervisor (tests/fakes.py) behind get_driver for the whole test: arrange and read its
    pools and domains; every driver the portal gets shares it, and so does the BMC client (FakeBmc)."""
    fake = FakeHost()
    for module in FAKE_DRIVER_SEAMS:
        monkeypatch.setattr(f"{module}.get_driver", fake.get_driver)
    monkeypatch.setattr("machines.bmc.get_client", lambda: FakeBmc(fake))  # BMCs on the same domains
    return fake


@pytest.fixture
def user(db):
    return UserFactory(username="alice")


@pytest.fixture
def staff(db):
    return UserFactory(username="root-staff", is_staff=True, is_superuser=True)


@pytest.fixture
def staff_client(staff):
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def user_client(user):
    client = Client()
    client.force_login(user)
    return client


# --- The real stack: processes started by the tests, stopped by their own process group. ---

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _stop(proc: subprocess.Popen) -> None:
    stop_groups([proc])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ports of the web server and console proxy the stack tests start, fixed for the session.
STACK_PORTS = {"web": _free_port(), "console": _free_port()}


def _database_url() -> str:
    """The test database (pytest-django's, made at session start) as a URL for the processes the tests start:
    the embedded SQLite file, or PostgreSQL's test_ database where DATABASE_URL named a server
    (scripts/engines.sh)."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    assert db["ENGINE"].endswith("postgresql"), f"no stack tests on {db['ENGINE']}"
    password = urllib.parse.quote(db["PASSWORD"], safe="")
    return f"postgres://{db['USER']}:{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


# With Huey on Redis (PORTAL_REDIS_URL, scripts/engines.sh) the stack runs two consumer processes on the one
# queue, as a scaled-out deployment does; the embedded SQLite queue has one.
WORKER_PROCESSES = 2 if settings.HUEY.get("huey_class") == "huey.RedisHuey" else 1


class WorkerProcesses:
    """The Huey consumer processes of the session: `pid` is the first's (the one that schedules periodic
    tasks), poll() the first exit code among them (None while all run)."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs
        self.pid = procs[0].pid
        self.pids = [p.pid for p in procs]

    def poll(self) -> int | None:
        return next((code for code in (p.poll() for p in self.procs) if code is not None), None)


FILE_SERVER_NETWORK = "127.0.0.1/32"  # where `file_server` listens: the only import destination the stack allows
# The CA bundle the stack's worker trusts for SSH key sources (PORTAL_SSH_KEY_CA_FILE, read at each fetch): a test
# that starts an HTTPS key server writes its CA here (tests/integration/test_ssh_key_sources.py).
SSH_KEY_CA_FILE = settings.DATA_DIR / "test-ssh-key-ca.pem"
METRICS_TOKEN = "stack-metrics-token"  # what the stack's /metrics accepts (tests/integration/test_metrics_scrape.py)


def _stack_env() -> dict:
    """The environment for portal processes that must share the test database."""
    return {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "PORTAL_CONSOLE_PORT": str(STACK_PORTS["console"]),
        "PORTAL_CONSOLE_ALLOWED_ORIGINS": f"http://127.0.0.1:{STACK_PORTS['web']}",
        "PORTAL_WORKER_HEARTBEAT": "1",
        # A live move lasts a second or more even on an idle machine, so one cancelled at once is cancelled.
        "PORTAL_LIVE_MIGRATION_BANDWIDTH_MIB_S": "64",
        # The stack imports test images from `file_server` on 127.0.0.1; every other address not public stays
        # refused (tests/integration/test_image_imports.py; the unit tests keep the empty default).
        "PORTAL_IMPORT_ALLOWED_NETWORKS": FILE_SERVER_NETWORK,
        "PORTAL_SSH_KEY_CA_FILE": str(SSH_KEY_CA_FILE),
        "PORTAL_METRICS_TOKEN": METRICS_TOKEN,
        # Leases checked every 5 s, a guest that ignores the shut-down powered off after 5 s, and deleted 18 s
        # after its lease's end (tests/integration/test_leases.py; nothing else has a lease).
        "PORTAL_LEASE_CHECK_INTERVAL": "5",
        "PORTAL_LEASE_POWEROFF_AFTER": "5",
        "PORTAL_LEASE_DELETE_AFTER_HOURS": "0.005",
    }


def _start(name: str, argv: list[str]) -> subprocess.Popen:
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        argv, cwd=settings.BASE_DIR, env=_stack_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_listening(proc: subprocess.Popen, port: int, name: str, timeout: float = 30) -> None:
    """Until the process accepts TCP on port; fail at once if it exits (its log is test-artifacts/<name>.log)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, f"{name} exited; see {ARTIFACTS / (name + '.log')}"
            assert time.monotonic() < deadline, f"{name} did not listen on port {port} within {timeout} s"
            time.sleep(0.2)


def _log_size(name: str) -> int:
    """Where this start's output will begin in test-artifacts/<name>.log (the logs are appended to)."""
    path = ARTIFACTS / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


def _log_since(name: str, offset: int) -> bytes:
    with open(ARTIFACTS / f"{name}.log", "rb") as f:
        f.seek(offset)
        return f.read()


def _wait_ready(proc: subprocess.Popen, name: str, log_start: int, ready, what: str, timeout: float = 60) -> None:
    """Poll ready() until it holds; fail at once if the process exits, or after `timeout` s, with its output."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"{what} within {timeout:g} s"
            tail = _log_since(name, log_start).decode(errors="replace")[-2000:]
            pytest.fail(f"{name} {state}; see {ARTIFACTS / (name + '.log')}:\n{tail}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def libvirtd():
    """The host's libvirtd, started by scripts/setup-host.sh (make test runs it)."""
    r = subprocess.run(["virsh", "-c", "qemu:///system", "uri"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (
        f"libvirtd does not answer on qemu:///system ({r.stderr.strip()}); run scripts/setup-host.sh"
    )
    return "qemu:///system"


@pytest.fixture(scope="session")
def huey_worker(django_db_setup, django_db_blocker):
    """A real Huey consumer process on the test database and the test queue."""
    HUEY.immediate = False  # reach the real queue, left over from an earlier run, and empty it
    HUEY.flush()
    HUEY.immediate = True
    procs = []
    for n in range(WORKER_PROCESSES):
        name = "worker" if n == 0 else f"worker{n + 1}"
        log_start = _log_size(name)
        # One schedules the periodic tasks; the others only consume (as the README says to run more).
        extra = [] if n == 0 else ["--no-periodic"]
        proc = _start(name, [sys.executable, "manage.py", "run_huey", "--workers", "2", "--flush-locks", *extra])
        procs.append(proc)
        # Ready when its worker threads have started: each records the heartbeat as it does (portal/tasks.py).
        with django_db_blocker.unblock():
            _wait_ready(
                proc,
                name,
                log_start,
                lambda proc=proc: Heartbeat.objects.filter(name=WORKER, detail__endswith=f" pid {proc.pid}").exists(),
                "recorded no heartbeat",
            )
    yield WorkerProcesses(procs)
    stop_groups(procs)


@pytest.fixture
def worker(huey_worker, transactional_db):
    """Tasks go to the real consumer for this test (commits are real: transactional_db)."""
    HUEY.immediate = False
    yield huey_worker
    HUEY.immediate = True
    _remove_leftover_machines()
    assert huey_worker.poll() is None, "a Huey consumer died during the test"


def _remove_leftover_machines() -> None:
    """A failed test must not leave domains or volumes on the host for the next one."""
    from hypervisors.drivers import get_driver
    from machines.models import Machine
    from machines.provisioning import deprovision

    for machine in Machine.objects.select_related("hypervisor"):
        try:
            driver = get_driver(machine.hypervisor.uri)
            deprovision(machine, driver)
        except Exception as e:  # noqa: BLE001 - best effort, reported
            print(f"could not remove leftover machine {machine.name}: {e}")


@pytest.fixture(scope="session")
def web_server(django_db_setup):
    """The portal under gunicorn, as `make run` serves it (static files by WhiteNoise)."""
    collect = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
        cwd=settings.BASE_DIR,
        env=_stack_env(),
        capture_output=True,
        text=True,
    )
    assert collect.returncode == 0, collect.stderr
    port = STACK_PORTS["web"]
    proc = _start(
        "web",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            "4",
        ],
    )
    _wait_listening(proc, port, "web")
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


@pytest.fixture(scope="session")
def console_proxy(django_db_setup):
    """`manage.py console_proxy` as `make run` starts it; yields its port."""
    port = STACK_PORTS["console"]
    proc = _start("console", [sys.executable, "manage.py", "console_proxy", "--port", str(port)])
    _wait_listening(proc, port, "console")
    yield port
    _stop(proc)


@pytest.fixture(scope="session")
def bmc_server(django_db_setup):
    """`manage.py bmc_server` as `make run` starts it, following the test database."""
    log_start = _log_size("bmc")
    proc = _start("bmc", [sys.executable, "manage.py", "bmc_server", "--interval", "0.5"])
    # Ready when it has set itself up and enters its loop, which it announces just before (its command).
    _wait_ready(
        proc, "bmc", log_start, lambda: b"BMC server: ports" in _log_since("bmc", log_start), "did not start its loop"
    )
    yield proc
    _stop(proc)


def wait_for(predicate, timeout: float, interval: float = 0.25, message: str = ""):
    """Poll until predicate() is truthy; return its value or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message or f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def file_server(settings):
    """Serves the test image directory over HTTP on loopback, for imports from a URL: the one address the stack's
    imports may reach (allowed here for the test process, whose services check a URL as it is given)."""
    settings.PORTAL_IMPORT_ALLOWED_NETWORKS = [FILE_SERVER_NETWORK]
    directory = str(Path(test_images()["tiny_disk"]).parent)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def local(worker, libvirtd):
    """The host's libvirtd registered as `local`, online."""
    from hypervisors import services as hv_services
    from hypervisors.models import Hypervisor, HypervisorStatus

    hv = hv_services.hypervisor_create(name="local", uri=libvirtd)
    return wait_for(lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status == HypervisorStatus.ONLINE and h, 30)


@pytest.fixture
def tiny_image(worker, file_server):
    """The tiny test guest in the catalogue, imported from a URL by the real worker."""
    from hypervisors import images
    from hypervisors.models import Image, ImageStatus

    name = Path(test_images()["tiny_disk"]).name
    image = images.image_create_from_url(
        name="tiny",
        kind="disk",
        fmt="qcow2",
        default_user="tiny",
        os_name="Tiny Linux",
        source_url=f"{file_server}/{name}",
    )
    image = wait_for(lambda: (i := Image.objects.get(pk=image.pk)).status != ImageStatus.IMPORTING and i, 60)
    assert image.status == ImageStatus.READY, image.status_message
    return image


@pytest.fixture
def tiny_iso(worker, file_server):
    """The tiny test guest's bootable ISO in the catalogue (kind iso), imported by the real worker."""
    from hypervisors import images
    from hypervisors.models import Image, ImageStatus

    name = Path(test_images()["tiny_iso"]).name
    image = images.image_create_from_url(
        name="tiny-installer",
        kind="iso",
        fmt="iso",
        default_user="",
        os_name="Tiny Linux installer",
        source_url=f"{file_server}/{name}",
    )
    image = wait_for(lambda: (i := Image.objects.get(pk=image.pk)).status != ImageStatus.IMPORTING and i, 60)
    assert image.status == ImageStatus.READY, image.status_message
    return image


def serial_log(machine_id: int, *needles: str, timeout: float = 90) -> str:
    """Ask the portal (through the worker) for a guest's serial log until every needle is in it."""
    from machines import services
    from machines.models import Machine

    def check():
        machine = Machine.objects.get(pk=machine_id)
        services.machine_serial_log_request(machine=machine, max_age=0)
        time.sleep(0.5)
        text = Machine.objects.get(pk=machine_id).last_observed.serial_log
        return text if all(n in text for n in needles) else None

    return wait_for(check, timeout, interval=1, message=f"serial log never showed {needles}")

"""Queries and time of the list endpoints and pages as the number of rows grows (issue 13).

Makes machines (each with two NICs, CD-ROMs for ISO machines, 20 events, an observed row, on one of ten
hypervisors carrying a sync's capabilities), half owned by a plain user and half shared with that user
through a project they operate, in a throwaway SQLite database. Prints the queries of every list endpoint
and page at SMALL and LARGE rows, as staff and as that user, then the p50 and p95 of
`GET /api/v1/machines/?limit=100` over 100 machines next to a baseline: a plain `Machine.objects.values()`
of the same 100 rows. Prints figures; asserts nothing. Needs no daemon.

Run: `.venv/bin/python bench/list_queries.py [RUNS]`.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
DATA = tempfile.mkdtemp(prefix="portal-bench-lists-")
os.environ.update(
    {"PORTAL_DATA_DIR": DATA, "DJANGO_SETTINGS_MODULE": "config.settings", "PORTAL_ALLOWED_HOSTS": "localhost"}
)

import django  # noqa: E402

from bench.common import pct, run_main  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
SMALL, LARGE, TIMED = 3, 30, 100
HTMX = {"HX-Request": "true"}
ENDPOINTS = [
    ("GET /api/v1/machines/", "/api/v1/machines/", {}, False),
    ("GET /api/v1/hypervisors/", "/api/v1/hypervisors/", {}, False),
    ("GET /api/v1/images/", "/api/v1/images/", {}, False),
    ("GET /api/v1/audit/", "/api/v1/audit/", {}, True),
    ("machine list page", "/machines/", {}, False),
    ("machine list partial (htmx)", "/machines/", HTMX, False),
    ("hypervisor list page", "/hypervisors/", {}, False),
    ("hypervisor list partial", "/hypervisors/", HTMX, False),
    ("image list page", "/hypervisors/images/", {}, False),
    ("image list partial", "/hypervisors/images/", HTMX, False),
    ("dashboard", "/", {}, False),
    ("audit page", "/audit/", {}, True),
]


def capabilities(i: int) -> dict:
    """What a sync stores of a host, about as large as this machine's own (qemu:///system: 2.7 KB of JSON that
    no list shows: machine types, CPU models, interfaces, devices)."""
    return {
        "status": "online",
        "cpus": 64,
        "memory_mib": 262144,
        "arch": "x86_64",
        "detected_domain_type": "kvm",
        "domain_types": ["qemu", "kvm"],
        "guest_arches": ["x86_64", "i686"],
        "machine_types": [f"pc-q35-7.{n}" for n in range(20)] + [f"pc-i440fx-7.{n}" for n in range(20)],
        "cpu_modes": ["host-passthrough", "host-model", "custom"],
        "cpu_models": [f"Model-{n}-v1" for n in range(20)],
        "firmwares": ["bios", "efi"],
        "interfaces": [{"name": f"eth{n}", "type": "ethernet", "active": True} for n in range(8)],
        "devices": [{"name": f"pci_0000_{n:02x}_00_0", "type": "pci", "product": "Ethernet"} for n in range(16)],
        "pools": [{"name": "default", "active": True, "capacity_bytes": 1 << 40, "available_bytes": 1 << 39}],
        "networks": [{"name": "default", "active": True, "forward_mode": "nat", "bridge": "virbr0"}],
        "unmanaged_domains": [{"name": f"other{i}", "uuid": "", "state": "running"}],
    }


def setup():
    from django.contrib.auth import get_user_model

    from hypervisors.models import Hypervisor
    from machines.models import Membership, Project, Role

    users = get_user_model().objects
    staff = users.create_user("staff", is_staff=True, is_superuser=True)
    member = users.create_user("member")
    project = Project.objects.create(name="shared")
    Membership.objects.create(project=project, user=member, role=Role.OPERATOR)
    hypervisors = [
        Hypervisor.objects.create(name=f"hv{i}", uri="test:///default", **capabilities(i)) for i in range(10)
    ]
    return staff, member, project, hypervisors


def fill(start: int, stop: int, member, project, hypervisors) -> None:
    """Machines start..stop-1, each with everything a list shows."""
    from django.contrib.auth import get_user_model

    from hypervisors.models import Image
    from machines.models import Machine, MachineCdrom, MachineEvent, MachineNic, MachineObserved
    from portal.models import AuditEvent

    for i in range(start, stop):
        kind = ("image", "iso", "network")[i % 3]
        image = None
        if kind != "network":
            iso = kind == "iso"
            image = Image.objects.create(
                name=f"image{i}", kind="iso" if iso else "disk", format="iso" if iso else "qcow2", status="ready"
            )
        owner = member if i % 2 else get_user_model().objects.create_user(f"owner{i}")
        bmc = {"bmc_address": "127.0.0.1", "bmc_port": 7000 + i, "bmc_username": f"bmc{i}"} if kind == "network" else {}
        machine = Machine.objects.create(
            name=f"m{i}",
            owner=owner,
            project=None if i % 2 else project,
            hypervisor=hypervisors[i % len(hypervisors)],
            image=image,
            deploy_type=kind,
            status="active",
            power_state="running",
            **bmc,
        )
        macs = [f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", f"52:54:00:01:{i // 256:02x}:{i % 256:02x}"]
        for index, mac in enumerate(macs):
            MachineNic.objects.create(machine=machine, index=index, type="network", source="default", mac=mac)
        if kind == "iso":
            MachineCdrom.objects.create(machine=machine, slot=0, image=image)
            MachineCdrom.objects.create(machine=machine, slot=1)
        MachineObserved.objects.create(machine=machine, guest_addresses={macs[0]: [f"192.0.2.{i % 250}/24"]})
        MachineEvent.objects.bulk_create(
            [MachineEvent(machine=machine, step="status", message=f"event {n} of m{i}") for n in range(20)]
        )
        AuditEvent.objects.create(username=owner.username, action="machine.create", object_type="machine")


def queries(client: Client, path: str, headers: dict) -> int:
    client.get(path, headers=headers)  # once first: one-off writes (a quota row made on the first visit)
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, headers=headers)
    assert response.status_code == 200, (path, response.status_code)
    return len(captured.captured_queries)


def count_all(clients: dict[str, Client]) -> dict[tuple[str, str], int]:
    return {
        (label, who): queries(client, path, headers)
        for label, path, headers, staff_only in ENDPOINTS
        for who, client in clients.items()
        if who == "staff" or not staff_only
    }


def timed(fn) -> list[float]:
    fn()  # warm up
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def report(label: str, times: list[float]) -> None:
    print(f"  {label:46s} p50 {pct(times, 50):7.2f} ms   p95 {pct(times, 95):7.2f} ms")


def main():
    from machines.models import Machine

    call_command("migrate", verbosity=0)
    # The pages render without collectstatic (as the unit tests do): the plain storage, no manifest.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    staff, member, project, hypervisors = setup()
    clients = {}
    for who, user in (("staff", staff), ("member", member)):
        clients[who] = Client(SERVER_NAME="localhost")
        clients[who].force_login(user)

    fill(0, SMALL, member, project, hypervisors)
    small = count_all(clients)
    fill(SMALL, LARGE, member, project, hypervisors)
    large = count_all(clients)
    print(f"Queries per request, {SMALL} and {LARGE} machines (events, hypervisors' unmanaged domains, audit rows)")
    print(f"  {'endpoint':32s} {'as':7s} {SMALL:>5d} {LARGE:>5d}")
    for (label, who), n in small.items():
        grows = "" if n == large[label, who] else "   grows"
        print(f"  {label:32s} {who:7s} {n:5d} {large[label, who]:5d}{grows}")

    fill(LARGE, TIMED, member, project, hypervisors)
    print(f"\nGET /api/v1/machines/?limit={TIMED} with {TIMED} machines, {RUNS} runs")
    url = f"/api/v1/machines/?limit={TIMED}"
    for who, client in clients.items():
        rows = len(client.get(url).json()["results"])
        report(f"as {who} ({rows} rows, {queries(client, url, {})} queries)", timed(lambda c=client: c.get(url)))
    report(f"baseline: Machine.objects.values() ({TIMED} rows)", timed(lambda: list(Machine.objects.values())))


if __name__ == "__main__":
    run_main(main, DATA)

"""Every list endpoint and list page costs the same number of queries whatever the number of rows (issue 13).

Each test fills the database with SMALL rows of everything a list shows (machines with NICs, CD-ROMs, events
and an observed row, each on its own hypervisor, with its own image and owner, in a project the plain user is
an operator of or owned by that user; audit events), counts the queries of one request, grows it to LARGE
rows and counts again: the two counts must be equal. As staff and as the plain project member.
"""

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from hypervisors.models import ImageStatus
from machines import access, policy
from machines.models import MachineEvent, MachineNic, MachineObserved, Membership, Role
from machines.states import PowerState, Status
from portal.models import AuditEvent
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, ProjectFactory, UserFactory

SMALL, LARGE = 3, 30
HTMX = {"HX-Request": "true"}

# (name, url name or path, headers, staff only)
ENDPOINTS = [
    ("api machines", "/api/v1/machines/", {}, False),
    ("api hypervisors", "/api/v1/hypervisors/", {}, False),
    ("api images", "/api/v1/images/", {}, False),
    ("api audit", "/api/v1/audit/", {}, True),
    ("api inventory", "/api/v1/inventory/", {}, False),
    ("inventory yaml", "inventory-yaml", {}, False),
    ("machine list", "machines:list", {}, False),
    ("machine list partial", "machines:list", HTMX, False),
    ("hypervisor list", "hypervisors:list", {}, False),
    ("hypervisor list partial", "hypervisors:list", HTMX, False),
    ("image list", "hypervisors:image-list", {}, False),
    ("image list partial", "hypervisors:image-list", HTMX, False),
    ("dashboard", "home", {}, False),
    ("audit page", "audit", {}, True),
]
CASES = [
    (name, url, headers, who)
    for name, url, headers, staff_only in ENDPOINTS
    for who in (("staff",) if staff_only else ("staff", "member"))
]


def _machine(i: int, member, project) -> None:
    """One machine of each kind in turn (image, ISO with two drives, network boot with a BMC), with all a list
    shows: its hypervisor (with capabilities), image, two NICs, addresses seen, three events."""
    kind = ("image", "iso", "network")[i % 3]
    hv = HypervisorFactory(
        pools=[{"name": "default", "active": True, "capacity_bytes": 100 << 30, "available_bytes": 60 << 30}],
        networks=[{"name": "default", "active": True}],
        unmanaged_domains=[{"name": f"other{i}"}],
        domain_types=["qemu"],
        detected_domain_type="qemu",
    )
    image = None
    if kind != "network":
        image = ImageFactory(status=ImageStatus.READY, **({"kind": "iso", "format": "iso"} if kind == "iso" else {}))
    # Every other machine is the member's own; the rest belong to others and are shared through the project.
    owner = member if i % 2 else UserFactory()
    machine = MachineFactory(
        owner=owner,
        project=None if i % 2 else project,
        hypervisor=hv,
        image=image,
        deploy_type=kind,
        status=Status.PROVISIONING if i % 5 == 4 else Status.ACTIVE,  # the dashboard lists busy ones
        power_state=PowerState.RUNNING if i % 2 else PowerState.OFF,
        **({"bmc_address": "127.0.0.1", "bmc_port": 7000 + i, "bmc_username": f"bmc{i}"} if kind == "network" else {}),
    )
    macs = [f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", f"52:54:00:01:{i // 256:02x}:{i % 256:02x}"]
    for index, mac in enumerate(macs):
        MachineNic.objects.create(machine=machine, index=index, type="network", source="default", mac=mac)
    if kind == "iso":
        machine.cdroms.create(slot=0, image=image)
        machine.cdroms.create(slot=1, image=None)
    MachineObserved.objects.create(machine=machine, guest_addresses={macs[0]: [f"192.0.2.{i % 250}/24"]})
    for step in ("created", "provision", "status"):
        MachineEvent.objects.create(machine=machine, step=step, message=f"{step} of {machine.name}")
    AuditEvent.objects.create(username=owner.username, action="machine.create", object_type="machine")


def _fill(start: int, stop: int, member, project) -> None:
    for i in range(start, stop):
        _machine(i, member, project)


def _count(client: Client, url: str, headers: dict) -> int:
    path = url if url.startswith("/") else reverse(url)
    client.get(path, headers=headers)  # once first: one-off writes (the dashboard makes a quota row on a first visit)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path, headers=headers)
    assert response.status_code == 200, (path, response.status_code)
    return len(queries.captured_queries)


@pytest.fixture
def member(db):
    return UserFactory(username="member")


@pytest.fixture
def project(member):
    project = ProjectFactory()
    Membership.objects.create(project=project, user=member, role=Role.OPERATOR)
    return project


def _client(who: str, member, staff) -> Client:
    client = Client()
    client.force_login(staff if who == "staff" else member)
    return client


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "url", "headers", "who"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_a_list_costs_the_same_queries_at_two_sizes(name, url, headers, who, member, project, staff):
    client = _client(who, member, staff)
    _fill(0, SMALL, member, project)
    small = _count(client, url, headers)
    _fill(SMALL, LARGE, member, project)
    large = _count(client, url, headers)
    assert small == large, f"{name} as {who}: {small} queries with {SMALL} rows, {large} with {LARGE}"


def _sql(queries: CaptureQueriesContext) -> str:
    return "\n".join(q["sql"] for q in queries.captured_queries)


@pytest.mark.django_db
def test_machine_lists_leave_the_hypervisors_capabilities_out(member, project, staff):
    _fill(0, SMALL, member, project)
    client = _client("staff", member, staff)
    for path in (reverse("machines:list"), "/api/v1/machines/", reverse("home")):
        with CaptureQueriesContext(connection) as queries:
            html = client.get(path).content.decode()
        assert "hv" in html  # the hypervisors' names are there
        assert '"hypervisors_hypervisor"."name"' in _sql(queries)
        for column in ("devices", "machine_types", "unmanaged_domains", "status_error"):
            assert f'"hypervisors_hypervisor"."{column}"' not in _sql(queries), (path, column)


@pytest.mark.django_db
def test_a_role_read_once_answers_as_the_lookup_per_machine(member, project):
    other = ProjectFactory()
    Membership.objects.create(project=other, user=member, role=Role.VIEWER)
    stranger = ProjectFactory()
    machines = [
        MachineFactory(project=project),
        MachineFactory(project=other),
        MachineFactory(project=stranger),
        MachineFactory(owner=member),
        MachineFactory(),
    ]
    roles = access.project_roles(member)
    assert roles == {project.pk: Role.OPERATOR, other.pk: Role.VIEWER}
    for machine in machines:
        assert access.level(member, machine, roles) == access.level(member, machine)
        assert policy.allowed_actions(member, machine, roles=roles) == policy.allowed_actions(member, machine)
    assert [access.level(member, m, roles) for m in machines] == [2, 1, 0, 3, 0]

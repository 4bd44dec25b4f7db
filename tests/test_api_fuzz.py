"""The JSON API under a schema-driven fuzzer (issue 14, "No input answers 500").

schemathesis reads the OpenAPI schema the portal serves (/api/v1/schema/) and, for every operation, sends
generated requests (valid ones and, for the bodies and parameters, invalid ones) in-process through the WSGI
application, authenticated with a real API token, once as staff and once as a plain user. Every answer must
be other than a 5xx, have a status code, content type and body that the schema declares.

The database holds a world for the requests to act on (a hypervisor, images, a machine of each deploy type for
each user, a project), made once for the module; path ids are steered to its rows most of the time. The
hypervisor is the in-memory fake (tests/fakes.py, behind every get_driver seam, as the `host` fixture puts it)
and Huey runs inline, so what a request queues runs against the fake before the checks. Each example runs in a
savepoint rolled back afterwards, and the fake is restored with it: every example sees the same world, and a
failure replays. Nothing leaves the machine: connections to any address but loopback fail.

Bounded: PORTAL_FUZZ_EXAMPLES examples per operation and user (default below), derandomized (the same inputs on
every run), no shrinking, each with a deadline; about 80 s for the whole API here on two cores.
"""

import copy
import dataclasses
import os
import socket
import subprocess
from contextlib import contextmanager
from datetime import timedelta

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core import signals
from django.db import close_old_connections, transaction
from django.test import TestCase, override_settings
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config.wsgi import application
from hypervisors.models import ImageStatus
from machines import services
from machines.models import Membership, Role
from portal.models import ApiToken, AuditEvent
from tests.conftest import FAKE_DRIVER_SEAMS
from tests.factories import HypervisorFactory, ImageFactory, ProjectFactory, UserFactory, tenant_network_entry
from tests.fakes import FakeBmc, FakeHost

MAX_EXAMPLES = int(os.environ.get("PORTAL_FUZZ_EXAMPLES", "10"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# The coverage phase is left out of the bounded run: it sends every boundary case the schema allows, whatever
# max_examples says (about 1,300 for a machine create alone, some 6 minutes for the API here). PORTAL_FUZZ_COVERAGE=1
# adds it for a long run.
CONFIG = SchemathesisConfig.from_dict(
    {"seed": 14, "phases": {"coverage": {"enabled": os.environ.get("PORTAL_FUZZ_COVERAGE") == "1"}}}
)
# Loaded as the portal serves it, at collection, with no database (pytest-django's blocker is on): the public
# schema must not query. (Not schemathesis.pytest.from_fixture: its lazy mode sets Function._nodeid, which
# pytest 9 no longer has.)
schema = schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", application, config=CONFIG)


def _no_network(mp: pytest.MonkeyPatch) -> None:
    """Nothing a fuzzed request names (a hypervisor URI, an import URL) is ever dialled: loopback only."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not str(address[0]).startswith(("127.", "::1")):
            raise OSError(f"the fuzz test dials nothing off this machine ({address[0]})")
        return real_connect(sock, address)

    mp.setattr(socket.socket, "connect", connect)


@contextmanager
def _wsgi_keeps_the_connection():
    """Django closes the database connection when a request ends; here that is the test's transaction, which
    must outlive each request (django.test.Client does the same while it calls the handler)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture(scope="module")
def world(django_db_setup, django_db_blocker, tmp_path_factory):
    """What the requests act on, made once for the module in a transaction rolled back at its end (each test's
    own `db` transaction nests in it): the ids per kind of path, the users' tokens and the fake host."""
    fake = FakeHost()
    tmp = tmp_path_factory.mktemp("fuzz-images")
    with (
        django_db_blocker.unblock(),
        pytest.MonkeyPatch.context() as mp,
        override_settings(PORTAL_IMAGE_DIR=tmp, PORTAL_BMC_PORT_RANGE="17300-17399"),
        _wsgi_keeps_the_connection(),
        transaction.atomic(),
    ):
        # Every seam where the portal asks for a driver (the `host` fixture's, and the hypervisors' own: sync,
        # networks, image copies) reaches the same fake; the BMCs too.
        for module in (*FAKE_DRIVER_SEAMS, "hypervisors.services", "hypervisors.networks", "hypervisors.images"):
            mp.setattr(f"{module}.get_driver", fake.get_driver)
        mp.setattr("machines.bmc.get_client", lambda: FakeBmc(fake))
        # A workflow run a request starts stays queued: ansible-playbook is a process of its own, which the
        # loopback guard below cannot hold (the engine's own tests run playbooks).
        mp.setattr("workflows.tasks.workflow_run_task", lambda run_id: None)
        _no_network(mp)
        with TestCase.captureOnCommitCallbacks(execute=True):
            data = _seed(tmp)
        data.update(_seed_workflows())  # once the machines are provisioned (active)
        data["host"], data["pristine"] = fake, _snapshot(fake)
        yield data
        transaction.set_rollback(True)


def _seed(tmp) -> dict:
    staff = UserFactory(username="fuzz-staff", is_staff=True, is_superuser=True)
    user = UserFactory(username="fuzz-user")
    project = ProjectFactory(name="fuzz-project")
    Membership.objects.create(project=project, user=user, role=Role.ADMIN)
    pool = {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0}
    hv = HypervisorFactory(
        name="lab",
        uri="qemu:///system",
        arch="x86_64",
        networks=[{"name": "default", "active": True}, tenant_network_entry()],
        pools=[{**pool, "available_bytes": 1 << 40}],
    )
    HypervisorFactory(name="spare", uri="qemu+tcp://127.0.0.1/system", pools=[{**pool, "available_bytes": 1 << 40}])
    disk_file = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(disk_file), "64M"], check=True, capture_output=True)
    disk = ImageFactory(
        name="tiny",
        status=ImageStatus.READY,
        file_name=disk_file.name,
        sha256="ab" * 32,
        file_size_bytes=disk_file.stat().st_size,
        virtual_size_bytes=64 << 20,
        default_user="tiny",
    )
    iso_file = tmp / "installer.iso"
    iso_file.write_bytes(b"\0" * 0x8001 + b"CD001" + b"\0" * 4096)
    iso = ImageFactory(
        name="installer",
        kind="iso",
        format="iso",
        status=ImageStatus.READY,
        file_name=iso_file.name,
        sha256="cd" * 32,
        file_size_bytes=iso_file.stat().st_size,
        virtual_size_bytes=iso_file.stat().st_size,
    )
    nics = [services.NicInput(type="network", source=django_settings.PORTAL_TENANT_NETWORK)]
    machines = []
    for owner, suffix, kw in ((staff, "s", {}), (user, "u", {}), (user, "p", {"project": project})):
        common = {"owner": owner, "hypervisor": hv, "memory_mib": 256, "disk_gib": 1, "nics": nics, **kw}
        machines += [
            services.machine_create(name=f"img-{suffix}", image=disk, **common),
            services.machine_create(name=f"iso-{suffix}", deploy_type="iso", image=iso, **common),
            services.machine_create(name=f"net-{suffix}", deploy_type="network", **common),
        ]
    labs = _seed_labs(staff, user, project, machines[-3:])
    return {
        **labs,
        "tokens": {who: ApiToken.issue(user=u)[1] for who, u in (("staff", staff), ("user", user))},
        "machines": [m.pk for m in machines],
        "hypervisors": [hv.pk],
        "images": [disk.pk, iso.pk],
        "audit": list(AuditEvent.objects.values_list("pk", flat=True)[:3]),
        "networks": [django_settings.PORTAL_TENANT_NETWORK, "default"],
    }


def _seed_labs(staff, user, project, project_machines) -> dict:
    """A lab of the project holding its machines, and a template for everyone of two tiny network-boot machines."""
    from labs.models import Lab, LabMachine, LabTemplate

    lab = Lab.objects.create(name="fuzz-lab", owner=user, project=project)
    for machine in project_machines:
        LabMachine.objects.create(lab=lab, machine=machine, group="g")
    net = django_settings.PORTAL_TENANT_NETWORK
    spec = f"bootable_vms:\n  vars: {{vm_count: 2, vm_ram: 128, vm_disk_size: 1, vm_networks: {{{net}: {{}}}}}}\n"
    template = LabTemplate.objects.create(name="fuzz-template", owner=staff, spec=spec)
    return {"labs": [lab.pk], "lab-templates": [template.pk]}


def _seed_workflows() -> dict:
    """A shipped workflow for everyone, and a queued run of it by the user on the project's image machine."""
    from machines.models import Machine
    from workflows import services as workflow_services

    staff, user = (get_user_model().objects.get(username=n) for n in ("fuzz-staff", "fuzz-user"))
    workflow = workflow_services.workflow_register(
        actor=staff, name="fuzz-facts", directory=str(workflow_services.EXAMPLES_DIR / "facts")
    )
    machine = Machine.objects.get(name="img-p")
    run = workflow_services.workflow_run_start(workflow=workflow, actor=user, machines=[machine], variables={})
    return {"workflows": [workflow.pk], "workflow-runs": [run.pk]}


def _steer(case, world) -> None:
    """Point a generated path id at a row of the world, three times in four (the rest stay as generated)."""
    params = case.path_parameters or {}
    kind = case.path.split("/")[3]  # /api/v1/<kind>/...
    value = params.get("id")
    if isinstance(value, int) and world.get(kind):
        rows = world[kind]
        slot = value % (len(rows) + len(rows) // 3 + 1)
        if slot < len(rows):
            params["id"] = rows[slot]
    name = params.get("name")
    if isinstance(name, str) and len(name) % 2 == 0:
        params["name"] = world["networks"][len(name) // 2 % 2]


def _snapshot(host):
    return {f.name: copy.deepcopy(getattr(host, f.name)) for f in dataclasses.fields(host)}


FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    # No shrinking: a failure is reported as found (with its curl line), and a failing run stays as short as a
    # passing one.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@schema.parametrize()
@FUZZ
def test_as_staff(case, world, db, django_capture_on_commit_callbacks):
    _call_and_check(case, world, django_capture_on_commit_callbacks, "staff")


@schema.parametrize()
@FUZZ
def test_as_a_plain_user(case, world, db, django_capture_on_commit_callbacks):
    _call_and_check(case, world, django_capture_on_commit_callbacks, "user")


def _call_and_check(case, world, django_capture_on_commit_callbacks, who: str) -> None:
    """One example in a savepoint, rolled back with the fake host after it: each starts from the same world."""
    _steer(case, world)
    try:
        with transaction.atomic(), _wsgi_keeps_the_connection():
            with django_capture_on_commit_callbacks(execute=True):
                response = case.call(headers={"Authorization": f"Token {world['tokens'][who]}"})
            case.validate_response(response, checks=CHECKS)
            transaction.set_rollback(True)
    finally:
        host = world["host"]
        for name, value in world["pristine"].items():
            setattr(host, name, copy.deepcopy(value))

"""A worker that dies or runs late (machines/attempts.py): every provision, rebuild, grow and delete is an attempt
that claims the machine, checks before each step that it still owns it, stops when it does not and removes what it
made unless a newer attempt owns the machine; any failure ends it; a dead worker's attempts are resumed; a
hypervisor runs at most PORTAL_HYPERVISOR_CONCURRENCY attempts at once."""

import os
import socket

import pytest
from huey.exceptions import RetryTask

from hypervisors.drivers.base import PowerState as DomainState
from machines import attempts, provisioning, services
from machines.models import Machine
from machines.states import Status
from tests.factories import HypervisorFactory, MachineFactory, UserFactory, tenant_network_entry, tenant_nic

pytestmark = pytest.mark.django_db

POOL = {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40}


@pytest.fixture
def hv(db):
    return HypervisorFactory(
        name="lab", uri="qemu:///system", arch="x86_64", networks=[tenant_network_entry()], pools=[POOL]
    )


def request(hv, name="m1", **kw) -> Machine:
    """A network-boot machine asked for, its provision not run yet (nothing commits in the test)."""
    return services.machine_create(
        owner=UserFactory(username=f"o-{name}"),
        hypervisor=hv,
        name=name,
        deploy_type="network",
        nics=[tenant_nic()],
        power_on=True,
        **kw,
    )


def made(host) -> set[str]:
    return set(host.domains) | set(host.pools["default"])


def during(monkeypatch, step: str, action):
    """Run `action` (the world changing under the worker) once the provisioning step `step` is done."""
    original = getattr(provisioning, step)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        action()
        return result

    monkeypatch.setattr(provisioning, step, wrapped)


def test_an_attempt_timed_out_by_the_reconcile_stops_and_removes_what_it_made(host, hv, monkeypatch):
    machine = request(hv)
    # The reconcile's deadline passes while the disk is made: it fails the machine and fences the attempt.
    during(
        monkeypatch,
        "ensure_blank_disk",
        lambda: Machine.objects.filter(pk=machine.pk).update(status=Status.ERROR, attempt_id=""),
    )
    services.machine_provision_run(machine.pk)
    after = Machine.objects.get(pk=machine.pk)
    assert after.status == Status.ERROR and after.attempt_id == ""
    assert made(host) == set()  # the disk it made went; no domain was defined after the fence
    assert "define" not in set(after.events.values_list("step", flat=True))
    assert after.events.filter(step="cleanup", message__startswith="a stopped attempt removed").exists()


def test_a_late_attempt_never_makes_the_machine_active(host, hv, monkeypatch):
    machine = request(hv)
    during(monkeypatch, "ensure_running", lambda: Machine.objects.filter(pk=machine.pk).update(attempt_id=""))
    services.machine_provision_run(machine.pk)
    assert Machine.objects.get(pk=machine.pk).status == Status.PROVISIONING  # not flipped to active by the late one
    assert made(host) == set()


def test_a_newer_attempts_work_is_left_alone(host, hv, monkeypatch):
    machine = request(hv)
    during(monkeypatch, "ensure_blank_disk", lambda: Machine.objects.filter(pk=machine.pk).update(attempt_id="other"))
    services.machine_provision_run(machine.pk)
    assert machine.disk_volume in host.pools["default"]  # the newer attempt's disk (same name) stays


def test_a_delete_issued_while_the_machine_provisions_leaves_nothing(
    django_capture_on_commit_callbacks, host, hv, monkeypatch
):
    machine = request(hv)
    owner = machine.owner
    # The owner deletes it while its disk is made: the delete runs at once, then the provision's next step.
    during(
        monkeypatch,
        "ensure_blank_disk",
        lambda: services.machine_delete_run(
            services.machine_delete(machine=Machine.objects.get(pk=machine.pk), actor=owner) or machine.pk
        ),
    )
    services.machine_provision_run(machine.pk)
    assert not Machine.objects.filter(pk=machine.pk).exists()
    assert made(host) == set()


def test_any_failure_ends_the_attempt_in_error_with_what_it_made_removed(host, hv, monkeypatch):
    machine = request(hv)

    def broken(*args, **kwargs):
        raise OSError(2, "No such file or directory", "/var/lib/portal/images/gone.qcow2")

    monkeypatch.setattr(provisioning, "ensure_domain", broken)
    services.machine_provision_run(machine.pk)
    after = Machine.objects.get(pk=machine.pk)
    assert after.status == Status.ERROR and after.attempt_id == ""
    assert after.status_message.startswith("FileNotFoundError: [Errno 2] No such file or directory")
    assert made(host) == set()


def test_a_hypervisor_runs_at_most_its_cap_of_attempts(host, hv, settings):
    settings.PORTAL_HYPERVISOR_CONCURRENCY = 1
    busy = MachineFactory(name="busy", hypervisor=hv, status=Status.PROVISIONING, attempt_id="x:1:1:a")
    machine = request(hv)
    with pytest.raises(RetryTask):
        services.machine_provision_run(machine.pk)
    assert Machine.objects.get(pk=machine.pk).attempt_id == "" and made(host) == set()
    HypervisorFactory(name="other")  # another host's attempts do not count here
    Machine.objects.filter(pk=busy.pk).update(attempt_id="")
    services.machine_provision_run(machine.pk)
    assert Machine.objects.get(pk=machine.pk).status == Status.ACTIVE
    assert host.domains[str(machine.uuid)]["state"] == DomainState.RUNNING


def test_a_dead_workers_attempts_are_resumed_and_a_live_ones_left(django_capture_on_commit_callbacks, host, hv):
    me = socket.gethostname()
    dead = request(hv, "dead")
    live = request(hv, "live")
    elsewhere = request(hv, "elsewhere")
    Machine.objects.filter(pk=dead.pk).update(attempt_id=f"{me}:{2**22 + 7}:123:abc")  # no such pid
    Machine.objects.filter(pk=live.pk).update(attempt_id=attempts.new_id())  # this very process
    Machine.objects.filter(pk=elsewhere.pk).update(attempt_id="another-host:1:1:abc")
    with django_capture_on_commit_callbacks(execute=True):
        assert services.machines_resume_dead_attempts() == ["dead: provisioning, resumed"]
    assert Machine.objects.get(pk=dead.pk).status == Status.ACTIVE
    assert Machine.objects.get(pk=live.pk).status == Status.PROVISIONING
    assert Machine.objects.get(pk=elsewhere.pk).status == Status.PROVISIONING
    event = Machine.objects.get(pk=dead.pk).events.get(step="recover")
    assert event.message == f"the worker that had it provisioning stopped (pid {2**22 + 7}); resumed"


def test_an_attempt_id_names_this_process():
    owner = attempts.owner_of(attempts.new_id())
    assert owner is not None and owner.pid == os.getpid() and owner.host == socket.gethostname() and owner.alive()
    assert attempts.owner_of("garbage") is None


@pytest.mark.parametrize("action", ["rebuild", "grow", "delete"])
def test_rebuild_grow_and_delete_wait_for_an_operation_in_progress(host, hv, action):
    from tests.factories import ImageFactory

    staff = UserFactory(username="boss", is_staff=True)
    image = ImageFactory(name="img", status="ready")
    machine = MachineFactory(name="busy", hypervisor=hv, image=image, status=Status.ACTIVE, operation="reboot")
    call = {
        "rebuild": lambda: services.machine_rebuild(machine=machine, actor=staff),
        "grow": lambda: services.machine_grow_disk(machine=machine, disk_gib=machine.disk_gib + 1, actor=staff),
        "delete": lambda: services.machine_delete(machine=machine, actor=staff),
    }[action]
    with pytest.raises(services.MachineError, match="busy with another operation"):
        call()
    assert Machine.objects.get(pk=machine.pk).status == Status.ACTIVE

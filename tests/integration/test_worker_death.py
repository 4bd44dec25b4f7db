"""A worker that dies mid-job, for real (machines/attempts.py): a Huey consumer SIGKILLed while it provisions an
image machine on the host's libvirtd, then started again, resumes the attempt it held and the machine ends active
with one domain and exactly its volumes; a delete issued while a machine provisions ends with no row, no domain
and no volume. The killed consumer is this test's own, on a queue of its own, so the session's worker never sees
its tasks."""

import os
import signal
import subprocess
import sys
import time

import pytest
from huey import SqliteHuey
from huey.contrib.djhuey import HUEY

from machines import services, tasks
from machines.models import Machine
from portal.processes import stop_groups
from tests.conftest import ARTIFACTS, _stack_env, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60
    ).stdout.strip()


def volumes_of(machine: Machine) -> set[str]:
    virsh("pool-refresh", "default")
    names = {line.split()[0] for line in virsh("vol-list", "default").splitlines()[2:] if line.strip()}
    return {n for n in names if str(machine.uuid) in n}


class OwnWorker:
    """A consumer on a queue of its own (its own data directory), sharing the test database."""

    def __init__(self, tmp_path) -> None:
        self.data = tmp_path / "own-worker"
        self.data.mkdir(exist_ok=True)
        self.queue = SqliteHuey(name="portal", filename=str(self.data / "huey.sqlite3"))
        self.proc: subprocess.Popen | None = None

    def enqueue(self, task) -> None:
        """Onto this worker's queue, serialised by the portal's own Huey (whose registry knows the tasks)."""
        self.queue.storage.enqueue(HUEY.serialize_task(task), task.priority)

    def start(self) -> subprocess.Popen:
        env = {**_stack_env(), "PORTAL_DATA_DIR": str(self.data)}
        log = open(ARTIFACTS / "own-worker.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "run_huey", "--workers", "2", "--no-periodic"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.proc

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_groups([self.proc])


@pytest.fixture
def own_worker(tmp_path, transactional_db, local):
    worker = OwnWorker(tmp_path)
    yield worker
    worker.stop()


def test_a_worker_killed_mid_provision_resumes_it_when_started_again(own_worker, tiny_image, local, monkeypatch):
    owner = UserFactory(username="crash", is_staff=True)
    monkeypatch.setattr("machines.services.lifecycle._enqueue", lambda *a: None)  # queued below, on our queue
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="crash1",
        image=tiny_image,
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    own_worker.enqueue(tasks.machine_provision_task.s(machine.pk))
    proc = own_worker.start()

    def mid_provision():
        m = Machine.objects.get(pk=machine.pk)
        assert m.status == "provisioning", f"finished before the kill ({m.status})"
        # Past its first step, so the attempt has made something on the hypervisor.
        return m if m.attempt_id and m.events.filter(step="image").exists() else None

    held = wait_for(mid_provision, 60, interval=0.005, message="the worker never began the provision")
    own_worker.kill()
    steps = list(Machine.objects.get(pk=machine.pk).events.values_list("step", flat=True))
    print(f"killed (pid {proc.pid}) holding {held.attempt_id} after steps {steps}")
    assert Machine.objects.get(pk=machine.pk).status == "provisioning"  # nothing ends it by itself

    restarted = own_worker.start()
    started = time.monotonic()
    done = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status != "provisioning" and m, 120)
    print(f"resumed by pid {restarted.pid}: {done.status} {time.monotonic() - started:.1f} s after the restart")
    assert done.status == "active", done.status_message
    assert done.events.filter(step="recover", message__contains=f"(pid {proc.pid}); resumed").exists()
    assert done.attempt_id == ""
    # One domain, running, and exactly the machine's volumes: nothing of the killed attempt is left over.
    assert virsh("domstate", str(machine.uuid)) == "running"
    assert virsh("list", "--all", "--uuid").split().count(str(machine.uuid)) == 1
    assert volumes_of(done) == set(done.volumes)

    monkeypatch.undo()
    services.machine_delete(machine=done, actor=owner)  # the session's worker runs this one
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    assert virsh("dominfo", str(machine.uuid)) == "" and volumes_of(done) == set()


def test_a_delete_issued_while_a_machine_provisions_leaves_nothing(worker, local, tiny_image):
    owner = UserFactory(username="hasty", is_staff=True)
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="hasty1",
        image=tiny_image,
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    busy = wait_for(
        lambda: (
            (m := Machine.objects.get(pk=machine.pk)).attempt_id
            and m.status == "provisioning"
            and m.events.filter(step="image").exists()
            and m
        ),
        60,
        interval=0.005,
        message="the provision never began",
    )
    steps = list(busy.events.values_list("step", flat=True))
    services.machine_delete(machine=busy, actor=owner)
    print(f"delete accepted while provisioning, after steps {steps}")
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60, message="the delete never finished")
    # The provision's attempt was fenced: whatever step it was in, it made nothing that outlived the delete.
    time.sleep(3)  # time for a late step of the fenced attempt to run and clean after itself
    assert virsh("dominfo", str(machine.uuid)) == ""
    assert volumes_of(machine) == set()

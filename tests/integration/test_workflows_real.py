"""Workflows for real: one Debian 12 guest with real cloud-init (the suite's cached image), created through the
portal by a project member with the real worker, reached from the host over SSH with the project's key, its host
key checked against the keys it printed on its serial console at first boot; the shipped "facts" and
"file-and-command" workflows run against it through workflow_run_start and the real worker, and the worker takes a
disk-only snapshot of it that its qemu-guest-agent quiesces.

The guest has two NICs. nic0 is on an isolated network the portal defines on the host's libvirtd (the host holds
the bridge's first address, the guest gets DHCP, nothing is routed off the machine). The portal network's guard
drops every flow the guest starts towards the host's address there but lets its replies to the host's own
connections through, so the host reaches the guest's port 22 on it (test_..._on_the_portal_network). nic1 is on a host bridge the test makes and publishes to the project (the host holds 10.213.80.1,
the guest a static 10.213.80.50, nothing else is on it): its host guard lets through only replies to
connections the host began, which is how the worker reaches the guest.

The guest is slow to boot under emulation, so every test of this module shares it (module-scoped fixtures on
committed rows, torn down and flushed at the end, as the transactional tests do).
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import override_settings
from huey.contrib.djhuey import HUEY

from hypervisors import images, networks
from hypervisors import services as hv_services
from hypervisors.drivers import get_driver
from hypervisors.drivers.domxml import agent_connected, disk_targets, guard_name, host_guard_name
from hypervisors.models import Hypervisor, HypervisorStatus, Image, ImageStatus, PublishedNetwork
from machines import hostkeys, projectkeys, provisioning, services, tasks
from machines.models import Machine, MachineSnapshot, Membership, Project, Role
from machines.services.common import _claim_operation
from portal.models import AuditEvent
from tests.conftest import FILE_SERVER_NETWORK, wait_for
from tests.factories import UserFactory
from tests.images import debian_cloud_image
from workflows import services as wf_services
from workflows.models import Workflow, WorkflowEvent, WorkflowRun

# The marker makes pytest-django set up the test database for this module; the per-test transaction or flush
# it would bring is replaced below, since the module's rows (its one guest) are real commits, flushed once.
# The first test also waits for the guest's first boot (minutes under emulation): the timeout covers it.
pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True), pytest.mark.timeout(1200)]

NET = f"wf-{uuidlib.uuid4().hex[:6]}"
CIDR, DHCP = "10.213.79.1/24", ("10.213.79.10", "10.213.79.60")
BRIDGE, BRIDGE_HOST, BRIDGE_GUEST = f"wfbr{NET[-4:]}", "10.213.80.1", "10.213.80.50"
GUEST = "wf-guest"


@dataclass
class Guest:
    machine: Machine
    project: Project
    member: object
    address: str  # on the host bridge, where the worker reaches it
    portal_network_address: str  # nic0's DHCP lease on the portal's isolated network
    boot_seconds: float
    workdir: Path

    def ssh(self, *command: str, key: Path | None = None, known_hosts: Path | None = None, user: str = "debian"):
        """ssh from the host (as the worker would), strict host key checking against `known_hosts`."""
        argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "IdentitiesOnly=yes"]
        argv += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts or '/dev/null'}"]
        argv += ["-i", str(key or self.workdir / "project_key"), f"{user}@{self.address}", *command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def _django_db_helper(db_access):
    """pytest-django's per-test database set-up, replaced: the module's db_access holds the database open."""
    return None


@pytest.fixture(scope="module")
def db_access(django_db_setup, django_db_blocker, huey_worker):
    """Real commits for the whole module (the worker process reads them), flushed at the end."""
    with django_db_blocker.unblock():
        HUEY.immediate = False
        try:
            yield huey_worker
        finally:
            HUEY.immediate = True
            call_command("flush", interactive=False, verbosity=0)


@pytest.fixture(scope="module")
def image_server():
    directory = str(Path(debian_cloud_image()).parent)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with override_settings(PORTAL_IMPORT_ALLOWED_NETWORKS=[FILE_SERVER_NETWORK]):
        yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _wait_network(hv: Hypervisor, name: str) -> dict:
    def seen():
        hv_services.hypervisor_sync(hv.pk)
        # Active with its guard (one sync may read the host's filters just before the worker defines both).
        listed = Hypervisor.objects.get(pk=hv.pk).networks
        return next((n for n in listed if n["name"] == name and n["active"] and n["guard"]), None)

    try:
        return wait_for(seen, 60, interval=1)
    except pytest.fail.Exception:
        trail = list(
            AuditEvent.objects.filter(action__startswith="hypervisor.network").values("action", "outcome", "detail")
        )
        pytest.fail(f"network {name} never came up: {trail}; {Hypervisor.objects.get(pk=hv.pk).networks}")


@pytest.fixture(scope="module")
def guest(db_access, libvirtd, image_server, tmp_path_factory):
    """The one Debian guest of the module, booted, with its host keys recorded and its address known."""
    workdir = tmp_path_factory.mktemp("wf")
    hv = hv_services.hypervisor_create(name="local", uri=libvirtd)
    hv = wait_for(lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status == HypervisorStatus.ONLINE and h, 120)
    spec = networks.NetworkSpec(
        name=NET, mode="isolated", bridge=f"vb{NET[-6:]}", cidr=CIDR, dhcp_start=DHCP[0], dhcp_end=DHCP[1]
    )
    driver = get_driver(hv.uri)
    machine = None
    try:
        for argv in (
            ["ip", "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0"],
            ["ip", "addr", "add", f"{BRIDGE_HOST}/24", "dev", BRIDGE],
            ["ip", "link", "set", BRIDGE, "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        networks.network_create(hypervisor=hv, spec=spec)
        assert _wait_network(hv, NET)["guard"] == guard_name(NET)
        project = Project.objects.create(name="wf-team")
        member = UserFactory(username="wf-member")  # not staff: the project's rules are its members'
        Membership.objects.create(project=project, user=member, role=Role.ADMIN)
        for kind, source in (("network", NET), ("bridge", BRIDGE)):
            published = PublishedNetwork.objects.create(hypervisor=hv, kind=kind, source=source)
            published.projects.add(project)

        path = Path(debian_cloud_image())
        image = images.image_create_from_url(
            name="debian-12",
            kind="disk",
            fmt="qcow2",
            default_user="debian",
            os_name="Debian 12",
            source_url=f"{image_server}/{path.name}",
        )
        image = wait_for(lambda: (i := Image.objects.get(pk=image.pk)).status != ImageStatus.IMPORTING and i, 180)
        assert image.status == ImageStatus.READY, image.status_message

        started = time.monotonic()
        machine = services.machine_create(
            owner=member,
            project=project,
            hypervisor=Hypervisor.objects.get(pk=hv.pk),
            name=GUEST,
            image=image,
            vcpus=2,
            memory_mib=1024,
            disk_gib=4,
            nics=[
                services.NicInput(type="network", source=NET),
                services.NicInput(type="bridge", source=BRIDGE, dhcp4=False, addresses=[f"{BRIDGE_GUEST}/24"]),
            ],
        )
        try:
            wait_for(lambda: Machine.objects.get(pk=machine.pk).status in ("active", "error"), 600)
        finally:
            machine = Machine.objects.get(pk=machine.pk)
            print(f"{GUEST} {machine.status} after {time.monotonic() - started:.0f} s:")
            print("\n".join(str(e) for e in machine.events.all()))
        assert machine.status == "active", machine.status_message
        # Cloud-init's end, and the host keys recorded from its serial console (the worker reads the log).
        recorded = wait_for(lambda: _host_keys_and_done(machine), 600, interval=3, message="no host keys recorded")
        boot_seconds = time.monotonic() - started
        leased = wait_for(lambda: _address(machine), 120, interval=2, message="nic0's lease never seen")
        _, private = projectkeys.project_keypair(Project.objects.get(pk=project.pk))
        (workdir / "project_key").write_text(private)
        os.chmod(workdir / "project_key", 0o600)
        print(f"guest {GUEST} at {BRIDGE_GUEST} and {leased}: cloud-init done, host keys in {boot_seconds:.0f} s")
        assert recorded
        yield Guest(Machine.objects.get(pk=machine.pk), project, member, BRIDGE_GUEST, leased, boot_seconds, workdir)
    finally:
        if machine is not None:
            provisioning.deprovision(Machine.objects.get(pk=machine.pk), driver)
        driver.remove_network(NET)
        driver.remove_guard(guard_name(NET))
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, timeout=30)
        if machine is not None:
            driver.remove_guard(host_guard_name(BRIDGE))


def _host_keys_and_done(machine: Machine) -> str | None:
    services.machine_serial_log_request(machine=machine, max_age=0)
    time.sleep(1)
    observed = Machine.objects.get(pk=machine.pk).last_observed
    return observed.ssh_host_keys if observed.ssh_host_keys and "finished at" in observed.serial_log else None


def _address(machine: Machine) -> str | None:
    services.machines_sync(machines=[machine])
    time.sleep(1)
    found = [a for a in Machine.objects.get(pk=machine.pk).last_observed.address_list if a.startswith("10.213.79.")]
    return found[0] if found else None


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5):
            return True
    except OSError:
        return False


def test_the_host_reaches_the_guests_ssh_through_the_host_guard(guest):
    """The host guard keeps the guest from the host's services, but the host's own connection to the guest's
    port 22 (what the worker's ansible opens) gets its answers."""
    assert wait_for(lambda: _port_open(guest.address, 22), 60, interval=2, message="port 22 never answered")


def test_the_host_reaches_the_guests_ssh_on_the_portal_network(guest):
    """The portal network's guard answers what the hypervisor begins (the guest still starts nothing towards
    it: tests/integration/test_guest_reach.py), so the worker reaches a guest there too."""
    assert _port_open(guest.portal_network_address, 22)


def test_the_recorded_host_keys_are_the_ones_the_guest_serves(guest):
    keys = guest.machine.last_observed.ssh_host_keys.splitlines()
    assert keys and all(len(k.split()) == 2 for k in keys)
    scanned = subprocess.run(["ssh-keyscan", "-T", "10", guest.address], capture_output=True, text=True, timeout=60)
    served = {" ".join(line.split()[1:3]) for line in scanned.stdout.splitlines() if line and not line.startswith("#")}
    assert served and served <= set(keys), (served, keys)
    assert [i.kind for i in hostkeys.fingerprints("\n".join(keys))]


def test_the_project_key_logs_in_with_the_host_key_checked(guest):
    known = guest.workdir / "known_hosts"
    known.write_text(hostkeys.known_hosts(guest.machine.last_observed.ssh_host_keys, guest.address))
    r = guest.ssh("hostname; cat ~/.ssh/authorized_keys", known_hosts=known)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == GUEST
    assert f"portal-project-{guest.project.name}" in r.stdout  # why the key is there, for whoever looks


def test_a_host_key_that_is_not_the_guests_is_refused(guest):
    wrong = guest.workdir / "wrong_known_hosts"
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD"
    wrong.write_text(hostkeys.known_hosts(other, guest.address))
    r = guest.ssh("true", known_hosts=wrong)
    assert r.returncode == 255 and "host key" in r.stderr.lower(), r.stderr


# The shipped workflows, through workflow_run_start and the real worker (ansible-runner, ssh with the project key,
# known_hosts from the recorded host keys).


@pytest.fixture(scope="module")
def examples(db_access):
    wf_services.workflow_examples_register()
    return {w.name: w for w in Workflow.objects.filter(project=None)}


def _run(guest: Guest, workflow: Workflow, variables: dict, timeout: float = 600) -> WorkflowRun:
    started = time.monotonic()
    run = wf_services.workflow_run_start(
        workflow=workflow, actor=guest.member, machines=[Machine.objects.get(pk=guest.machine.pk)], variables=variables
    )
    done = ("successful", "failed", "error", "cancelled")
    said: list[str] = []

    def ended():
        r = WorkflowRun.objects.get(pk=run.pk)
        said.append(r.status_message)
        return r.status in done and r

    run = wait_for(ended, timeout, interval=1)
    run.said = " | ".join(dict.fromkeys(said))  # what the run page showed as it went
    print(f"{workflow.name} run {run.pk}: {run.status} in {time.monotonic() - started:.1f} s ({run.said})")
    return run


def _events(run: WorkflowRun, task: str) -> list[WorkflowEvent]:
    return [e for e in run.events.filter(task=task) if e.status]


FILE = {"path": "/tmp/portal-workflow-test.txt", "content": "written by the workflow test", "command": "uname -n"}


def test_facts_reach_the_guest_over_ssh_with_its_host_key_checked(guest, examples):
    run = _run(guest, examples["facts"], {"wait_timeout": 120})
    assert run.status == "successful", (run.status_message, run.stdout[-3000:])
    assert "host keys checked for" in run.said and "SSH with the project's key" in run.said, run.said
    printed = _events(run, "Print the hostname")
    assert printed and printed[0].status == "ok"
    assert f"hostname={GUEST}" in str(printed[0].data) + printed[0].stdout
    assert "distribution=Debian 12" in str(printed[0].data) + printed[0].stdout
    assert list(run.summary) and all(v.get("failures", 0) == 0 for v in run.summary.values()), run.summary


def test_file_and_command_writes_reads_back_and_a_second_run_changes_nothing(guest, examples):
    first = _run(guest, examples["file-and-command"], FILE)
    assert first.status == "successful", (first.status_message, first.stdout[-3000:])
    assert [e.status for e in _events(first, "Write the file")] == ["changed"]
    shown = _events(first, "Show the file")
    assert shown and f"holds: {FILE['content']}" in str(shown[0].data) + shown[0].stdout
    ran = _events(first, "Show its output")
    assert ran and GUEST in str(ran[0].data) + ran[0].stdout  # the command's output: the guest's own name

    second = _run(guest, examples["file-and-command"], FILE)
    assert second.status == "successful", (second.status_message, second.stdout[-3000:])
    assert [e.status for e in _events(second, "Write the file")] == ["ok"]  # idempotent
    known = guest.workdir / "known_hosts_check"
    known.write_text(hostkeys.known_hosts(guest.machine.last_observed.ssh_host_keys, guest.address))
    r = guest.ssh("cat", FILE["path"], known_hosts=known)
    assert r.returncode == 0 and r.stdout == FILE["content"] + "\n", r.stderr


def test_a_disk_only_snapshot_of_the_running_guest_is_quiesced_by_its_guest_agent(guest):
    """The image's qemu-guest-agent answers on the domain's org.qemu.guest_agent.0 channel, so the worker's
    disk-only snapshot of the running guest has it freeze the guest's filesystems first (the guest's own journal
    says so) and is marked quiesced. The portal snapshots a BIOS machine internally, with its memory (nothing to
    quiesce there), and this image boots by SeaBIOS only, so the row is made external here as a UEFI machine's is;
    the rest is the portal's own: the worker's machine_snapshot_task takes it and snapshot_delete merges it back,
    leaving the guest running on its own disk for the module's last test."""
    machine = Machine.objects.get(pk=guest.machine.pk)
    uuid, driver = str(machine.uuid), get_driver(machine.hypervisor.uri)
    assert services.snapshot_method(machine) == "internal"  # what the portal would take of it
    disks = disk_targets(driver.domain_xml(uuid))
    wait_for(lambda: agent_connected(driver.domain_xml(uuid)), 120, interval=2, message="the agent never connected")
    known = guest.workdir / "known_hosts_snapshot"
    known.write_text(hostkeys.known_hosts(machine.last_observed.ssh_host_keys, guest.address))

    snap = MachineSnapshot.objects.create(machine=machine, name="quiesced", kind="external", created_by=guest.member)
    _claim_operation(machine, "snapshot")  # as snapshot_create does before it queues the task
    started = time.monotonic()
    tasks.machine_snapshot_task(snap.pk)
    try:
        snap = wait_for(lambda: (s := MachineSnapshot.objects.get(pk=snap.pk)).status in ("ready", "error") and s, 180)
        took = time.monotonic() - started
        assert snap.status == "ready", snap.status_message
        assert (snap.kind, snap.memory, snap.quiesced) == ("external", False, True)
        said = [e.message for e in Machine.objects.get(pk=machine.pk).events.filter(step="snapshot")]
        assert "snapshot quiesced taken (external, disk-only, quiesced by the guest agent)" in said, said
        overlays = disk_targets(driver.domain_xml(uuid))
        assert all(overlays[t] != disks[t] for t in disks), (disks, overlays)  # the guest writes to the overlays
        journal = guest.ssh("sudo -n journalctl -t qemu-ga -o cat --no-pager", known_hosts=known)
        assert journal.returncode == 0, journal.stderr
        assert "guest-fsfreeze called" in journal.stdout, journal.stdout[-2000:]
        wrote = guest.ssh("echo thawed > /tmp/after-snapshot && sync && cat /tmp/after-snapshot", known_hosts=known)
        assert (wrote.returncode, wrote.stdout) == (0, "thawed\n"), wrote.stderr  # thawed: it writes again
        print(f"quiesced disk-only snapshot of the running Debian guest taken in {took:.1f} s")
    finally:
        settled = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).operation == "" and m, 180)
        started = time.monotonic()
        services.snapshot_delete(machine=settled, snapshot=MachineSnapshot.objects.get(pk=snap.pk), actor=guest.member)
        wait_for(lambda: not MachineSnapshot.objects.filter(pk=snap.pk).exists(), 300, interval=1)
        wait_for(lambda: Machine.objects.get(pk=machine.pk).operation == "", 60)
        print(f"merged back in {time.monotonic() - started:.1f} s")
    assert driver.snapshot_list(uuid) == []
    assert disk_targets(driver.domain_xml(uuid)) == disks  # back on its own disk
    assert Machine.objects.get(pk=machine.pk).power_state == "running"
    assert guest.ssh("cat /tmp/after-snapshot", known_hosts=known).stdout == "thawed\n"


def test_an_unreachable_host_fails_the_run_with_its_output_kept(guest, examples):
    """Last: it stops the guest."""
    machine = Machine.objects.get(pk=guest.machine.pk)
    services.machine_power(machine=machine, action="poweroff", actor=guest.member)
    wait_for(lambda: Machine.objects.get(pk=machine.pk).power_state != "running", 120, interval=1)
    wait_for(lambda: not _port_open(guest.address, 22), 60, interval=1)
    run = _run(guest, examples["file-and-command"], FILE)
    assert run.status == "failed", run.status
    assert [e.status for e in _events(run, "Write the file")] == ["unreachable"]
    assert "unreachable" in run.stdout.lower() or "UNREACHABLE" in run.stdout
    assert run.summary and any(v.get("dark", 0) or v.get("unreachable", 0) for v in run.summary.values()), run.summary

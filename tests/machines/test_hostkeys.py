"""Host keys from the first boot's serial console: the first block only, every line a key, never replaced
(a guest can print a block of its own later), read only while the log is that first boot's, whole."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from hypervisors.drivers.base import HypervisorUnavailable
from machines import hostkeys, provisioning, services
from machines.models import MachineObserved
from machines.services import observation
from machines.states import DeployType, Status
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD"
EC = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5Y"
    "RrYMjNuG5N87uRgg6CLrbo5wAdT/y8v2MOdoyeSXVHR3OsKWYZAyU0="
)
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def block(*lines: str) -> str:
    return "\r\n".join([hostkeys.BEGIN, *lines, hostkeys.END]) + "\r\n"


BOOT = (
    "[    0.000000] Linux version 6.1.0\r\n"
    "<14>Dec  3 10:00:01 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n"
    "<14>Dec  3 10:00:01 cloud-init: 256 SHA256:abc root@guest (ED25519)\r\n"
    "<14>Dec  3 10:00:01 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----\r\n"
    + block(f"{EC} root@guest", f"{ED} root@guest")
    + "Cloud-init v. 22.4.2 finished at Thu, 03 Dec 2026 10:00:02 +0000.\r\n"
)


def test_the_first_block_gives_its_keys_without_the_guests_comments():
    assert hostkeys.first_host_keys_block(BOOT) == [EC, ED]


def test_a_later_block_never_replaces_the_first():
    assert hostkeys.first_host_keys_block(BOOT + block(OTHER)) == [EC, ED]


@pytest.mark.parametrize(
    "log",
    [
        "no block here\n",
        hostkeys.BEGIN + "\n" + ED + "\n",  # still being printed
        block(ED, "[   12.3] random: crng init done"),  # interleaved output: not a key
        block(ED, "ssh-ed25519 AAAA"),  # a line that is not a valid key
        block(),  # empty
        block(ED, hostkeys.BEGIN, ED),  # nested
        "echo " + hostkeys.BEGIN + "\n" + ED + "\n" + hostkeys.END + "\n",  # a marker inside another line
    ],
)
def test_anything_but_a_clean_first_block_gives_nothing(log):
    assert hostkeys.first_host_keys_block(log) is None


def test_a_bad_first_block_is_not_made_good_by_a_later_one():
    assert hostkeys.first_host_keys_block(block("not a key") + block(OTHER)) is None


def test_fingerprints_and_known_hosts():
    (info,) = hostkeys.fingerprints(ED)
    assert info.fingerprint.startswith("SHA256:") and info.kind == "ED25519"
    assert hostkeys.known_hosts(f"{ED}\n{EC}\n", "web1", "10.0.0.5") == f"web1,10.0.0.5 {ED}\nweb1,10.0.0.5 {EC}\n"
    assert hostkeys.known_hosts(ED) == ""


@pytest.fixture
def booted(db, monkeypatch):
    """An image machine in its first boot (created, started once), whose serial log a test sets."""
    machine = MachineFactory(deploy_type=DeployType.IMAGE)
    machine.log("create", "requested")
    machine.log("start", "started")
    log = {"text": BOOT}
    monkeypatch.setattr(observation, "get_driver", lambda uri: None)
    monkeypatch.setattr(provisioning, "fetch_serial_log", lambda machine, driver: log["text"])
    machine.serial = log
    return machine


def stored(machine) -> str:
    return MachineObserved.objects.get(machine=machine).ssh_host_keys


def test_the_serial_log_fetch_records_the_first_boots_keys_once(booted):
    observation.machine_serial_log_run(booted.pk)
    assert stored(booted) == f"{EC}\n{ED}"
    assert booted.events.filter(step="host-keys").count() == 1
    # The guest prints a block of its own later (and the first one scrolled away): nothing changes.
    booted.serial["text"] = block(OTHER)
    observation.machine_serial_log_run(booted.pk)
    assert stored(booted) == f"{EC}\n{ED}"
    assert booted.events.filter(step="host-keys").count() == 1


@pytest.mark.parametrize("step", ["power", "start", "migrate"])
def test_a_log_from_a_later_boot_is_not_trusted(booted, step):
    """The log is truncated at every start: after a power action, a second start or a move, its first block
    may be one the guest printed itself (cloud-init prints the keys once per instance)."""
    booted.log(step, "again")
    observation.machine_serial_log_run(booted.pk)
    assert stored(booted) == ""


def test_a_log_cut_to_its_tail_is_not_trusted(booted):
    booted.serial["text"] = BOOT + "x" * provisioning.SERIAL_LOG_LIMIT
    observation.machine_serial_log_run(booted.pk)
    assert stored(booted) == ""


def test_other_deploy_types_are_not_read(booted):
    type(booted).objects.filter(pk=booted.pk).update(deploy_type=DeployType.ISO)
    observation.machine_serial_log_run(booted.pk)
    assert stored(booted) == ""


def test_a_rebuild_clears_them_and_the_new_first_boot_records_new_ones(booted, monkeypatch):
    observation.machine_serial_log_run(booted.pk)
    assert stored(booted)
    monkeypatch.setattr("machines.services.lifecycle._enqueue", lambda *a: None)  # the worker's part is not this test's
    type(booted).objects.filter(pk=booted.pk).update(status=Status.ACTIVE, image=ImageFactory(ready=True))
    services.machine_rebuild(machine=type(booted).objects.get(pk=booted.pk), actor=booted.owner)
    assert stored(booted) == ""
    booted.log("rebuild", "removed everything")
    booted.serial["text"] = block(OTHER)
    observation.machine_serial_log_run(booted.pk)  # rebuilt, not started yet: not its first boot
    assert stored(booted) == ""
    booted.log("start", "started")
    observation.machine_serial_log_run(booted.pk)
    assert stored(booted) == OTHER


def test_machine_host_keys_reads_the_log_when_none_are_known(booted):
    assert observation.machine_host_keys(machine=booted) == f"{EC}\n{ED}"


def test_machine_host_keys_is_empty_when_the_hypervisor_does_not_answer(booted, monkeypatch):
    def down(machine, driver):
        raise HypervisorUnavailable("down")

    monkeypatch.setattr(provisioning, "fetch_serial_log", down)
    assert observation.machine_host_keys(machine=booted) == ""


def test_the_machine_page_shows_the_fingerprints(client, db):
    machine = MachineFactory(deploy_type=DeployType.IMAGE)
    client.force_login(machine.owner)
    page = client.get(reverse("machines:detail", args=[machine.pk])).content.decode()
    assert 'id="host-keys"' in page and "not known yet" in page
    MachineObserved.objects.create(machine=machine, ssh_host_keys=f"{EC}\n{ED}")
    page = client.get(reverse("machines:detail", args=[machine.pk])).content.decode()
    for info in hostkeys.fingerprints(f"{EC}\n{ED}"):
        assert info.fingerprint in page
    assert "(ECDSA)" in page and "(ED25519)" in page


def test_the_reconcile_reads_the_logs_of_machines_in_their_first_boot(db, monkeypatch):
    asked = []
    monkeypatch.setattr(observation, "machine_serial_log_request", lambda machine, max_age: asked.append(machine.pk))
    hv = HypervisorFactory(status="online")
    booting = MachineFactory(hypervisor=hv, deploy_type=DeployType.IMAGE, status=Status.ACTIVE, power_state="running")
    known = MachineFactory(hypervisor=hv, deploy_type=DeployType.IMAGE, status=Status.ACTIVE, power_state="running")
    MachineObserved.objects.create(machine=known, ssh_host_keys=ED)
    MachineFactory(hypervisor=hv, deploy_type=DeployType.ISO, status=Status.ACTIVE, power_state="running")
    old = MachineFactory(hypervisor=hv, deploy_type=DeployType.IMAGE, status=Status.ACTIVE, power_state="running")
    type(old).objects.filter(pk=old.pk).update(status_changed=timezone.now() - timedelta(hours=2))
    observation._watch_first_boots(timezone.now())
    assert asked == [booting.pk]

"""Applying an import's plan through the services, on the in-memory hypervisor: what it makes, its progress and
report, and that a second run changes nothing."""

import pytest

from hypervisors.models import Hypervisor
from labs.importer import ImportRefused, inventory_import_apply, inventory_import_create
from labs.models import InventoryImport, Lab
from machines.models import Machine
from portal.models import AuditEvent
from tests.factories import ImageFactory, UserFactory

PHYS = """\
all:
  vars:
    ansible_user: root
  children:
    libvirt_hosts:
      hosts:
        kvm-a:
          ansible_host: 198.51.100.20
          server_networks:
            prov:
              interface: br-prov
              type: bridge
"""

VMS = """\
all:
  children:
    all_vms:
      vars:
        vm_virt_host: kvm-a
        vm_networks:
          prov:
            dhcp: true
            interface: eth0
      children:
        provisioned_vms:
          hosts:
            web-0:
              vm_image_name: tiny
              vm_cores: 1
              vm_ram: 256
              vm_disk_size: 1
        bootable_vms:
          hosts:
            node-0:
              vm_cores: 1
              vm_ram: 256
              vm_disk_size: 1
              vm_vbmc_port: 16001
              vm_vbmc_username: admin
              vm_vbmc_password: secrete
"""


@pytest.fixture
def fake_world(host, monkeypatch):
    """The in-memory host behind the hypervisor services too (registration's sync, network definition)."""
    monkeypatch.setattr("hypervisors.services.get_driver", host.get_driver)
    monkeypatch.setattr("hypervisors.networks.get_driver", host.get_driver)
    return host


def run_import(owner, django_capture_on_commit_callbacks) -> InventoryImport:
    with django_capture_on_commit_callbacks(execute=True):
        imp = inventory_import_create(
            actor=owner,
            owner=owner,
            files=[{"name": "inventory-phys.yaml", "text": PHYS}, {"name": "lab-vms.yaml", "text": VMS}],
        )
        inventory_import_apply(imp=imp, actor=owner)
    imp.refresh_from_db()
    return imp


@pytest.mark.django_db
def test_it_applies_the_plan_and_a_second_run_changes_nothing(fake_world, django_capture_on_commit_callbacks):
    owner = UserFactory(username="mover", is_staff=True)
    ImageFactory(name="tiny", ready=True, sha256="ab" * 32)
    imp = run_import(owner, django_capture_on_commit_callbacks)
    assert imp.status == "done", imp.report
    assert (imp.done_steps, imp.total_steps) == (4, 4)  # register, define prov, two machines
    assert "hypervisor kvm-a: registered (qemu+ssh://root@198.51.100.20/system)" in imp.report
    assert "network prov on kvm-a: defined" in imp.report
    assert "machine web-0: created on kvm-a (image), in lab lab-vms" in imp.report
    assert "machine node-0: created on kvm-a (network), in lab lab-vms" in imp.report
    hv = Hypervisor.objects.get(name="kvm-a")
    assert hv.console_address == "198.51.100.20" and "prov" in fake_world.networks
    web, node = Machine.objects.get(name="web-0"), Machine.objects.get(name="node-0")
    assert (web.hypervisor, web.deploy_type, web.memory_mib, web.nics.get().source) == (hv, "image", 256, "prov")
    assert node.deploy_type == "network" and node.bmc_username not in ("", "admin")  # its own BMC credentials
    lab = Lab.objects.get(name="lab-vms")
    assert {(m.machine.name, m.group) for m in lab.members.all()} == {
        ("web-0", "provisioned_vms"),
        ("node-0", "bootable_vms"),
    }
    assert any(line.startswith("warning: lab-vms.yaml:") and "admin/secrete" in line for line in imp.report)
    assert AuditEvent.objects.filter(action="lab.import", outcome="success").count() == 1
    assert AuditEvent.objects.filter(action="machine.create").count() == 2

    before = (Hypervisor.objects.count(), Machine.objects.count(), set(fake_world.networks), len(fake_world.domains))
    again = run_import(owner, django_capture_on_commit_callbacks)
    assert again.status == "done" and again.done_steps == 0 and again.total_steps == 0, again.report
    assert "hypervisor kvm-a: already registered (qemu+ssh://root@198.51.100.20/system)" in again.report
    assert "machine web-0: already there" in again.report and "machine node-0: already there" in again.report
    after = (Hypervisor.objects.count(), Machine.objects.count(), set(fake_world.networks), len(fake_world.domains))
    assert after == before


@pytest.mark.django_db
def test_an_import_is_applied_once(fake_world, django_capture_on_commit_callbacks):
    owner = UserFactory(is_staff=True)
    imp = run_import(owner, django_capture_on_commit_callbacks)
    with pytest.raises(ImportRefused, match="done already"):
        inventory_import_apply(imp=imp, actor=owner)


@pytest.mark.django_db
def test_a_machine_the_owner_may_not_have_is_a_report_line(fake_world, django_capture_on_commit_callbacks):
    """Not staff: the host network prov is not published to them, and machine_create says so; the rest goes on."""
    owner = UserFactory(username="plain")
    ImageFactory(name="tiny", ready=True, sha256="cd" * 32)
    imp = run_import(owner, django_capture_on_commit_callbacks)
    assert imp.status == "done"
    assert any(line.startswith("machine web-0: not created: NIC 1:") for line in imp.report), imp.report
    assert not Machine.objects.exists()


def _attempt_of_a_dead_worker() -> str:
    """An attempt id of this host naming a process that has ended."""
    import socket
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    return f"{socket.gethostname()}:{ended.pid}:1:deadbeef0000"


@pytest.mark.django_db
def test_an_import_whose_worker_died_is_resumed_by_the_next_worker_and_makes_nothing_twice(fake_world):
    from labs.importer import inventory_imports_resume_dead
    from machines import attempts

    owner = UserFactory(username="mover", is_staff=True)
    ImageFactory(name="tiny", ready=True, sha256="ef" * 32)
    files = [{"name": "inventory-phys.yaml", "text": PHYS}, {"name": "lab-vms.yaml", "text": VMS}]
    imp = inventory_import_create(actor=owner, owner=owner, files=files)
    # The dead worker had registered the hypervisor and said so, then stopped.
    InventoryImport.objects.filter(pk=imp.pk).update(
        status="applying", attempt_id=_attempt_of_a_dead_worker(), report=["hypervisor kvm-a: registered"]
    )
    alive = inventory_import_create(actor=owner, owner=owner, files=files)
    InventoryImport.objects.filter(pk=alive.pk).update(status="applying", attempt_id=attempts.new_id())

    assert inventory_imports_resume_dead() == [imp.pk]  # the live worker's import is left to it
    imp.refresh_from_db()
    assert imp.status == "done" and imp.attempt_id == "", imp.report
    assert imp.report[:2] == ["hypervisor kvm-a: registered", imp.report[1]] and "resumed" in imp.report[1]
    assert Machine.objects.filter(name="web-0").count() == 1 and Hypervisor.objects.filter(name="kvm-a").count() == 1
    assert inventory_imports_resume_dead() == []  # once
    assert InventoryImport.objects.get(pk=alive.pk).status == "applying"

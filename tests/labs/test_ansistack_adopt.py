"""Machines whose domain is already on the hypervisor are adopted (machines.services.machine_adopt), not made
again; where the portal has no adoption, the report says so and nothing is made."""

import uuid as uuidlib

import pytest

from hypervisors import services as hv_services
from hypervisors.models import Hypervisor
from labs.models import Lab
from machines.models import Machine
from tests.factories import HypervisorFactory, UserFactory
from tests.labs.test_ansistack_apply import run_import

GIB = 1 << 30


def legacy_domain(name: str) -> str:
    """A domain someone defined by hand, its disk a volume in the default pool."""
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid><memory unit='KiB'>262144</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/fake/default/legacy-web.qcow2'/><target dev='vda' bus='virtio'/></disk>"
        "<graphics type='vnc' port='-1' autoport='yes'/></devices></domain>"
    )


@pytest.fixture
def kvm_a(host, monkeypatch):
    """kvm-a registered and synced already, with web-0's domain on it, defined by hand."""
    monkeypatch.setattr("hypervisors.services.get_driver", host.get_driver)
    monkeypatch.setattr("hypervisors.networks.get_driver", host.get_driver)
    host.pools["default"]["legacy-web.qcow2"] = {"format": "qcow2", "capacity": GIB, "backing": "", "data": b""}
    uuid = host.add_foreign(legacy_domain("web-0"))
    hv = HypervisorFactory(name="kvm-a", uri="qemu+ssh://root@198.51.100.20/system")
    assert hv_services.hypervisor_sync(hv.pk) == "online"
    return Hypervisor.objects.get(pk=hv.pk), uuid


@pytest.mark.django_db
def test_a_domain_already_there_is_adopted_once(kvm_a, django_capture_on_commit_callbacks):
    hv, uuid = kvm_a
    owner = UserFactory(username="mover", is_staff=True)
    imp = run_import(owner, django_capture_on_commit_callbacks)
    machine = {m["name"]: m for m in imp.plan["machines"]}["web-0"]
    assert (machine["action"], machine["domain_uuid"]) == ("adopt", uuid)
    assert "machine web-0: adopted on kvm-a, in lab lab-vms" in imp.report, imp.report
    web = Machine.objects.get(name="web-0")
    assert web.adopted and str(web.uuid) == uuid and web.hypervisor == hv
    assert Lab.objects.get(name="lab-vms").members.filter(machine=web, group="provisioned_vms").exists()
    again = run_import(owner, django_capture_on_commit_callbacks)
    assert "machine web-0: already there" in again.report and again.done_steps == 0, again.report
    assert Machine.objects.filter(name="web-0").count() == 1


@pytest.mark.django_db
def test_without_adoption_the_report_says_so(kvm_a, monkeypatch, django_capture_on_commit_callbacks):
    monkeypatch.delattr("machines.services.machine_adopt", raising=False)
    owner = UserFactory(username="mover", is_staff=True)
    imp = run_import(owner, django_capture_on_commit_callbacks)
    assert "machine web-0: adopt (not applied: adoption unavailable)" in imp.report, imp.report
    assert not Machine.objects.filter(name="web-0").exists()

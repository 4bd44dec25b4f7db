"""manage.py import_ansistack: the plan as report lines (--dry-run), or the plan applied."""

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from hypervisors.models import Hypervisor
from machines.models import Machine
from tests.factories import UserFactory
from tests.labs.test_ansistack_apply import PHYS, VMS

FIXTURES = Path(__file__).parent / "fixtures"


def command(*args: str) -> str:
    out = StringIO()
    call_command("import_ansistack", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_dry_run_prints_the_plan_and_changes_nothing():
    UserFactory(username="mover")
    out = command(
        str(FIXTURES / "inventory-phys.yaml"),
        str(FIXTURES / "inventory-vms.yaml"),
        "--vars",
        str(FIXTURES / "vars-main.yml"),
        "--owner",
        "mover",
        "--dry-run",
    )
    assert "hypervisor kvm-a (qemu+ssh://labops@198.51.100.10/system): register" in out
    assert "image debian12: import from https://images.example.org/debian-12-genericcloud-amd64.qcow2" in out
    assert "machine node-0 on kvm-b [bootable_vms; network, 2 vCPU, 4096 MiB, 30 GiB]: create" in out
    assert "error: inventory-vms.yaml:48: stray-0: vm_virt_host kvm-z" in out
    assert out.rstrip().endswith("dry run: 13 steps planned, nothing changed")
    assert not Hypervisor.objects.exists()


@pytest.mark.django_db
def test_it_applies(tmp_path, host, monkeypatch):
    monkeypatch.setattr("hypervisors.services.get_driver", host.get_driver)
    monkeypatch.setattr("hypervisors.networks.get_driver", host.get_driver)
    UserFactory(username="mover", is_staff=True)
    (tmp_path / "phys.yaml").write_text(PHYS)
    (tmp_path / "vms.yaml").write_text(VMS)
    out = command(str(tmp_path / "phys.yaml"), str(tmp_path / "vms.yaml"), "--owner", "mover", "--lab", "moved")
    assert "hypervisor kvm-a: registered (qemu+ssh://root@198.51.100.20/system)" in out
    assert "machine node-0: created on kvm-a (network), in lab moved" in out
    assert "machine web-0: not created (image tiny missing)" in out
    assert Machine.objects.get().name == "node-0"


@pytest.mark.django_db
def test_bad_arguments_are_command_errors(tmp_path):
    with pytest.raises(CommandError, match="No user nobody"):
        command(str(FIXTURES / "inventory-vms.yaml"), "--owner", "nobody", "--dry-run")
    UserFactory(username="mover")
    with pytest.raises(CommandError, match="cannot read"):
        command(str(tmp_path / "absent.yaml"), "--owner", "mover", "--dry-run")

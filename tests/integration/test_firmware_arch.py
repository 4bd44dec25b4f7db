"""UEFI and another architecture, for real: OVMF boots the tiny guest from a GPT disk, and an arm64
guest boots under emulation with AAVMF on QEMU's virt machine, both through the portal's pipeline."""

import subprocess
from pathlib import Path

import pytest

from hypervisors import images
from hypervisors.models import Image, ImageStatus
from machines import services
from machines.models import Machine
from tests.conftest import serial_log, wait_for
from tests.factories import UserFactory
from tests.images import firmware_images

pytestmark = pytest.mark.integration


def import_image(file_server, key: str, name: str, arch: str) -> Image:
    path = Path(firmware_images()[key])
    image = images.image_create_from_url(
        name=name, kind="disk", fmt="qcow2", default_user="tiny", arch=arch, source_url=f"{file_server}/{path.name}"
    )
    image = wait_for(lambda: (i := Image.objects.get(pk=image.pk)).status != ImageStatus.IMPORTING and i, 60)
    assert image.status == ImageStatus.READY, image.status_message
    return image


def boot(local, image, name, **hw) -> Machine:
    machine = services.machine_create(
        owner=UserFactory(username=f"o-{name}"),
        hypervisor=local,
        name=name,
        image=image,
        memory_mib=512,
        disk_gib=1,
        **hw,
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    return machine


def test_a_uefi_machine_boots(worker, local, file_server):
    assert "efi" in local.firmwares  # OVMF, found through libvirt's firmware descriptors
    image = import_image(file_server, "tiny_uefi_disk", "tiny-uefi", "x86_64")
    machine = boot(local, image, "uefi1", firmware="uefi", machine_type="q35")
    log = serial_log(machine.pk, "TINY-GRUB x86_64-efi", "TINY-GUEST ready", timeout=120)
    assert "BdsDxe" in log  # the UEFI boot manager, not SeaBIOS
    services.machine_delete(machine=machine, actor=machine.owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)


def test_an_arm64_machine_boots_under_emulation(worker, local, file_server):
    assert "aarch64" in local.guest_arches
    image = import_image(file_server, "arm64_disk", "tiny-arm64", "aarch64")
    machine = boot(local, image, "arm1")
    log = serial_log(machine.pk, "TINY-ARM64 ready", timeout=150)
    assert "TINY-ARM64 arch=aarch64" in log
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", str(machine.uuid)], capture_output=True, text=True
    ).stdout
    # The portal chose what an emulated arm64 guest needs: TCG, virt, a 64-bit CPU, UEFI.
    for fragment in ("type='qemu'", "arch='aarch64'", "machine='virt", ">cortex-a57</model>", "AAVMF"):
        assert fragment in xml, fragment
    services.machine_delete(machine=machine, actor=machine.owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)

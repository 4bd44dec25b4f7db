"""Real cloud-init: a Debian 12 guest (built with debootstrap, cached) configured by the portal's seed.

Its one NIC is QEMU user-mode with a static address outside slirp's network, so the guest
cannot send traffic anywhere; cloud-init still applies and reports the address.
"""

from pathlib import Path

import pytest

from hypervisors import images
from hypervisors.models import Image, ImageStatus
from machines import services
from machines.models import Machine
from tests.conftest import serial_log, wait_for
from tests.factories import UserFactory
from tests.images import debian_cloud_image

pytestmark = pytest.mark.integration

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD tester@portal"


@pytest.fixture
def debian_image(worker, file_server):
    path = Path(debian_cloud_image())
    image = images.image_create_from_url(
        name="debian-12",
        kind="disk",
        fmt="qcow2",
        default_user="debian",
        os_name="Debian 12",
        source_url=f"{file_server}/{path.name}",
    )
    image = wait_for(lambda: (i := Image.objects.get(pk=image.pk)).status != ImageStatus.IMPORTING and i, 120)
    assert image.status == ImageStatus.READY, image.status_message
    return image


def test_cloud_init_applies_hostname_key_static_address_and_script(local, debian_image):
    owner = UserFactory(username="cloud-owner", is_staff=True)  # staff: the user-mode NIC (the point is cloud-init)
    nic = services.NicInput(
        type="user", dhcp4=False, addresses=["192.0.2.10/24"], gateway4="192.0.2.1", nameservers=["192.0.2.53"]
    )
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="cloudy",
        image=debian_image,
        vcpus=2,
        memory_mib=1024,
        disk_gib=4,
        nics=[nic],
        ssh_authorized_keys=KEY,
        script="#!/bin/sh\necho PORTAL-SCRIPT-RAN $(hostname)\n",
        user_data="#cloud-config\nruncmd:\n- [sh, -c, 'echo USER-DATA-MERGED > /dev/console']\n",
    )
    wait_for(lambda: Machine.objects.get(pk=machine.pk).status in ("active", "error"), 120)
    machine.refresh_from_db()
    assert machine.status == "active", machine.status_message

    log = serial_log(machine.pk, "PORTAL-SCRIPT-RAN cloudy", "finished at", timeout=300)
    assert "192.0.2.10" in log and machine.nics.get().mac in log  # the static address, on the NIC matched by MAC
    assert "Authorized keys from /home/debian/.ssh/authorized_keys for user debian" in log
    assert "tester@portal" in log
    assert "USER-DATA-MERGED" in log  # the user's runcmd ran after the portal's
    assert "cloudy login:" in log
    assert "resizing filesystem" in log  # growpart and resize2fs filled the 4 GiB disk

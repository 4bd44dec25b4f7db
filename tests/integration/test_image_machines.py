"""Image deployment for real: the Huey consumer, libvirtd and QEMU boot the tiny test guest.

One booted guest is shared by the whole lifecycle (create, serial log, power,
grow, rebuild, delete) since booting is the slow part under emulation.
"""

import subprocess
import time

import pytest
from rest_framework.test import APIClient

from hypervisors import services as hv_services
from hypervisors.images import image_dir
from hypervisors.models import Hypervisor, HypervisorStatus, Image, ImageCopy
from machines import services
from machines.models import Machine
from portal.models import ApiToken
from tests.conftest import serial_log, wait_for
from tests.factories import MachineFactory, UserFactory

pytestmark = pytest.mark.integration

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcmrUPZ3pFJmjK8bXB3GB+oBd8rD8bh2l6t5BRpHAyD tester@portal"


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def api(worker):
    user = UserFactory(username="tester", is_staff=True)
    _, raw = ApiToken.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    client.user = user
    return client


def test_image_machine_lifecycle(api, local, tiny_image):
    image = tiny_image
    started = time.monotonic()
    r = api.post(
        "/api/v1/machines/",
        {
            "name": "tiny1",
            "deploy_type": "image",
            "hypervisor": "local",
            "image": image.pk,
            "vcpus": 1,
            "memory_mib": 256,
            "disk_gib": 1,
            "nics": [{"type": "user"}],
            "ssh_authorized_keys": [KEY],
            "packages": ["htop"],
            "user_data": "#cloud-config\nwrite_files:\n- path: /etc/portal-marker\n  content: marker-4711\n",
            "script": "#!/bin/sh\necho hello from the portal\n",
        },
        format="json",
    )
    assert r.status_code == 201, r.content
    mid = r.json()["id"]
    body = wait_for(
        lambda: (b := api.get(f"/api/v1/machines/{mid}/").json())["status"] in ("active", "error") and b, 120
    )
    assert body["status"] == "active", body["status_message"]
    assert body["power_state"] == "running"
    print(f"request to running: {time.monotonic() - started:.1f} s")
    steps = [e["step"] for e in body["events"]]
    for step in ["create", "image", "disk", "seed", "define", "start"]:
        assert step in steps

    machine = Machine.objects.get(pk=mid)
    assert virsh("domstate", str(machine.uuid)).stdout.strip() == "running"
    assert body["uuid"] == str(machine.uuid)

    # The disk is a thin overlay on the pool's copy of the image, never a full copy.
    copy = ImageCopy.objects.get(image=image, hypervisor=local)
    disk = virsh("vol-dumpxml", "--pool", "default", machine.disk_volume).stdout
    assert f"<path>{copy.path}</path>" in disk and "<backingStore>" in disk
    assert f"<capacity unit='bytes'>{1 << 30}</capacity>" in disk

    # What the portal sent, as the guest read it from its cidata CD.
    log = serial_log(mid, "TINY-GUEST hostname=tiny1", "marker-4711", "TINY-GUEST ready")
    assert KEY in log and "local-hostname: tiny1" in log and "hello from the portal" in log
    assert f"instance-id: {machine.instance_id}" in log

    # Power through the API: off, then on again.
    assert api.post(f"/api/v1/machines/{mid}/power/", {"action": "poweroff"}, format="json").status_code == 202
    wait_for(lambda: Machine.objects.get(pk=mid).power_state == "off" and not Machine.objects.get(pk=mid).operation, 30)
    assert virsh("domstate", str(machine.uuid)).stdout.strip() == "shut off"
    busy = api.post(f"/api/v1/machines/{mid}/power/", {"action": "bogus"}, format="json")
    assert busy.status_code == 400
    assert api.post(f"/api/v1/machines/{mid}/power/", {"action": "start"}, format="json").status_code == 202
    wait_for(lambda: Machine.objects.get(pk=mid).power_state == "running", 30)

    # Grow the disk while it runs.
    assert api.post(f"/api/v1/machines/{mid}/grow-disk/", {"disk_gib": 2}, format="json").status_code == 202
    wait_for(lambda: Machine.objects.get(pk=mid).status == "active", 30)
    assert (
        f"<capacity unit='bytes'>{2 << 30}</capacity>"
        in virsh("vol-dumpxml", "--pool", "default", machine.disk_volume).stdout
    )

    # Rebuild: a fresh disk and a fresh instance-id.
    old_instance = machine.instance_id
    assert api.post(f"/api/v1/machines/{mid}/rebuild/").status_code == 202
    wait_for(lambda: Machine.objects.get(pk=mid).status in ("active", "error"), 120)
    machine.refresh_from_db()
    assert machine.status == "active", machine.status_message
    assert machine.instance_id != old_instance
    serial_log(mid, f"instance-id: {machine.instance_id}", "TINY-GUEST ready")

    # Protected: delete is refused and touches nothing.
    api.post(f"/api/v1/machines/{mid}/protection/", {"deletion_protection": True}, format="json")
    r = api.delete(f"/api/v1/machines/{mid}/")
    assert r.status_code == 409 and "protected" in r.json()["detail"]
    assert virsh("domstate", str(machine.uuid)).stdout.strip() == "running"

    # Delete leaves no domain and no volume behind; the image copy stays for the next machine.
    api.post(f"/api/v1/machines/{mid}/protection/", {"deletion_protection": False}, format="json")
    assert api.delete(f"/api/v1/machines/{mid}/").status_code == 202
    wait_for(lambda: not Machine.objects.filter(pk=mid).exists(), 60)
    assert virsh("dominfo", str(machine.uuid)).returncode != 0
    volumes = virsh("vol-list", "default").stdout
    for name in machine.volumes:
        assert name not in volumes
    assert copy.volume in volumes

    # Hypervisors with machines cannot be deleted; without, they can.
    assert Hypervisor.objects.filter(pk=local.pk).exists()


def test_a_hypervisor_with_machines_cannot_be_deleted(worker, local):
    user = UserFactory(username="owner1")
    MachineFactory(name="held", owner=user, hypervisor=local, deploy_type="network")
    with pytest.raises(hv_services.HypervisorInUse, match="still has 1 machine"):
        hv_services.hypervisor_delete(hypervisor=local)
    assert Hypervisor.objects.filter(pk=local.pk).exists()


def test_a_malicious_qcow2_is_refused_at_upload(api, tmp_path):
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(evil), "1M"],
        check=True,
        capture_output=True,
    )
    with open(evil, "rb") as f:
        r = api.post(
            "/api/v1/images/", {"name": "evil", "kind": "disk", "format": "qcow2", "file": f}, format="multipart"
        )
    assert r.status_code == 201
    body = wait_for(
        lambda: (b := api.get(f"/api/v1/images/{r.json()['id']}/").json())["status"] != "importing" and b, 30
    )
    assert body["status"] == "error" and "backing file" in body["status_message"]
    assert not (image_dir() / Image.objects.get(pk=body["id"]).file_name).exists()  # the refused file is gone


def test_a_hypervisor_lost_during_provisioning_is_retried_without_orphans(worker, libvirt_tcp_proxy, tiny_image):
    """libvirtd unreachable when the pipeline runs: the task retries, then finishes with one of everything."""
    hv = hv_services.hypervisor_create(name="flaky", uri=f"qemu+tcp://127.0.0.1:{libvirt_tcp_proxy.port}/system")
    hv = wait_for(lambda: (h := Hypervisor.objects.get(pk=hv.pk)).status == HypervisorStatus.ONLINE and h, 30)
    owner = UserFactory(username="flaky-owner", is_staff=True)  # staff: the user-mode NIC (the point is the retry)

    libvirt_tcp_proxy.stop()
    machine = services.machine_create(
        owner=owner,
        hypervisor=hv,
        name="flaky1",
        image=tiny_image,
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
    )
    wait_for(lambda: machine.events.filter(step="retry").exists(), 30, message="no retry was scheduled")
    assert Machine.objects.get(pk=machine.pk).status == "provisioning"
    libvirt_tcp_proxy.start()

    wait_for(lambda: Machine.objects.get(pk=machine.pk).status in ("active", "error"), 90)
    machine.refresh_from_db()
    assert machine.status == "active", machine.status_message
    assert virsh("domstate", str(machine.uuid)).stdout.strip() == "running"
    names = [n for n in virsh("list", "--all", "--name").stdout.split() if n.startswith("flaky1-")]
    assert names == [machine.domain_name]
    volumes = [line.split()[0] for line in virsh("vol-list", "default").stdout.splitlines()[2:] if line.strip()]
    assert volumes.count(machine.disk_volume) == 1 and volumes.count(machine.seed_volume) == 1

    services.machine_delete(machine=machine, actor=machine.owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    assert virsh("dominfo", str(machine.uuid)).returncode != 0
    assert machine.disk_volume not in virsh("vol-list", "default").stdout


def test_hardware_options_boot_on_the_real_hypervisor(worker, local, tiny_image):
    owner = UserFactory(username="hw-owner", is_staff=True)
    assert "qemu64" in local.cpu_models and "pc-i440fx-7.2" in local.machine_types  # from the real sync
    machine = services.machine_create(
        owner=owner,
        hypervisor=local,
        name="hw1",
        image=tiny_image,
        vcpus=2,
        memory_mib=256,
        disk_gib=1,
        nics=[services.NicInput(type="user")],
        machine_type="pc-i440fx-7.2",
        cpu_mode="custom",
        cpu_model="qemu64",
        cpu_topology=[1, 2, 1],
        smbios={"manufacturer": "AnsiStack", "serial": "HW-0001"},
        watchdog=True,
        rng=True,
        disk_cache="writeback",
        extra_disks=[1],
        qemu_args=["-no-user-config"],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 120)
    assert machine.status == "active", machine.status_message
    xml = virsh("dumpxml", str(machine.uuid)).stdout
    for fragment in (
        "<model fallback='forbid'>qemu64</model>",
        "cores='2'",
        "<entry name='serial'>HW-0001</entry>",
        "<watchdog model='i6300esb' action='reset'>",
        "<rng model='virtio'>",
        "cache='writeback'",
        "machine='pc-i440fx-7.2'",
        machine.extra_disk_volume(0),
        "<qemu:arg value='-no-user-config'/>",
    ):
        assert fragment in xml, fragment
    serial_log(machine.pk, "TINY-GUEST ready")
    services.machine_delete(machine=machine, actor=machine.owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60)
    assert machine.extra_disk_volume(0) not in virsh("vol-list", "default").stdout

"""Adopting a domain on the host's libvirtd through the real worker: a tiny guest defined by hand with virsh (its
disk a volume of the default pool, its NIC on an isolated network made for the test, a VNC console without a
password) is seen by the sync, adopted through the service and the worker (rows, disks, NICs and MACs, the
portal's mark on the domain, which keeps its name), powered on and off through the portal with its VNC server now
asking a password, then deleted keeping its disk: the domain is gone, the volume is still there.

The host's libvirtd is shared with other test runs: everything here is named with a tag and removed at the end."""

import socket
import subprocess
import time
import uuid as uuidlib

import pytest

from hypervisors import services as hv_services
from hypervisors.drivers import get_driver
from hypervisors.drivers.domxml import portal_domain
from hypervisors.models import Hypervisor
from machines import services
from machines.models import Machine
from portal.models import AuditEvent
from tests.conftest import wait_for
from tests.factories import UserFactory
from tests.images import test_images

pytestmark = pytest.mark.integration


def virsh(*args: str, check: bool = True) -> str:
    done = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def security_types(address: tuple[str, int]) -> list[int]:
    """What a VNC server offers an RFB 3.8 client: 1 is no authentication, 2 VNC's password challenge."""
    with socket.create_connection(address, timeout=10) as s:
        assert s.recv(12).startswith(b"RFB ")
        s.sendall(b"RFB 003.008\n")
        count = s.recv(1)[0]
        return list(s.recv(count))


@pytest.fixture
def handmade(libvirtd, tmp_path):
    """An isolated network (a bridge, no addresses, no dnsmasq) and a tiny guest on it, defined with virsh."""
    tag = uuidlib.uuid4().hex[:6]
    names = {"net": f"adopt-net-{tag}", "dom": f"legacy-{tag}", "vol": f"legacy-{tag}.qcow2"}
    uuid, mac = str(uuidlib.uuid4()), f"52:54:00:ad:{tag[:2]}:{tag[2:4]}"
    (tmp_path / "net.xml").write_text(f"<network><name>{names['net']}</name><bridge name='vbad{tag}'/></network>")
    virsh("net-define", str(tmp_path / "net.xml"))
    virsh("net-start", names["net"])
    tiny = test_images()["tiny_disk"]
    virsh("vol-create-as", "default", names["vol"], "64M", "--format", "qcow2")
    virsh("vol-upload", "--pool", "default", names["vol"], tiny)
    virsh("pool-refresh", "default")
    path = virsh("vol-path", "--pool", "default", names["vol"]).strip()
    (tmp_path / "dom.xml").write_text(
        f"<domain type='qemu'><name>{names['dom']}</name><uuid>{uuid}</uuid><memory unit='MiB'>192</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>"
        "<target dev='vda' bus='virtio'/></disk>"
        f"<interface type='network'><mac address='{mac}'/><source network='{names['net']}'/>"
        "<model type='virtio'/></interface>"
        "<serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial'/></console>"
        "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/></devices></domain>"
    )
    virsh("define", str(tmp_path / "dom.xml"))
    yield {**names, "uuid": uuid, "mac": mac, "path": path}
    virsh("destroy", uuid, check=False)
    virsh("undefine", uuid, check=False)
    virsh("vol-delete", "--pool", "default", names["vol"], check=False)
    virsh("net-destroy", names["net"], check=False)
    virsh("net-undefine", names["net"], check=False)


def test_a_handmade_domain_is_adopted_managed_and_deleted_keeping_its_disk(worker, local, handmade):
    uuid = handmade["uuid"]
    staff = UserFactory(username="adopt-staff", is_staff=True)
    assert hv_services.hypervisor_sync(local.pk) == "online"  # what the worker's periodic sync runs
    seen = next(d for d in Hypervisor.objects.get(pk=local.pk).unmanaged_domains if d["uuid"] == uuid)
    assert seen["adoptable"], seen["problems"]
    assert [(d["pool"], d["volume"], d["capacity_bytes"]) for d in seen["disks"]] == [
        ("default", handmade["vol"], 64 << 20)
    ]
    assert seen["nics"] == [{"type": "network", "source": handmade["net"], "mac": handmade["mac"], "model": "virtio"}]

    started = time.monotonic()
    machine = services.machine_adopt(hypervisor=local, domain_uuid=uuid, owner=staff, actor=staff)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk, status="provisioning").exists(), 60)
    failed = AuditEvent.objects.filter(action="machine.adopt_run", outcome="failed").values_list("detail", flat=True)
    machine = Machine.objects.filter(pk=machine.pk).first()
    assert machine is not None and machine.status == "active", list(failed)
    print(f"adopted by the worker in {time.monotonic() - started:.2f} s")
    assert (machine.name, machine.domain_name, str(machine.uuid), machine.adopted) == (
        handmade["dom"],
        handmade["dom"],
        uuid,
        True,
    )
    assert (machine.vcpus, machine.memory_mib, machine.disk_gib, machine.pool) == (1, 192, 1, "default")
    assert [(n.mac, n.type, n.source) for n in machine.nics.all()] == [(handmade["mac"], "network", handmade["net"])]
    events = " | ".join(machine.events.values_list("message", flat=True))
    assert f"disk vda (virtio): default/{handmade['vol']}, qcow2, 1 GiB" in events and "boot hd" in events
    mark = portal_domain(virsh("dumpxml", "--inactive", uuid))
    assert mark is not None and mark[0] == handmade["dom"] and mark[1]["adopted"] == uuid
    assert mark[1]["id"] == str(machine.pk)
    assert "passwd=" in virsh("dumpxml", "--inactive", "--security-info", uuid)  # its console asks one from now on
    hv_services.hypervisor_sync(local.pk)
    assert uuid not in {d["uuid"] for d in Hypervisor.objects.get(pk=local.pk).unmanaged_domains}

    services.machine_power(machine=machine, action="start", actor=staff)
    wait_for(lambda: virsh("domstate", uuid).strip() == "running", 60, message="the portal's start")
    address = wait_for(lambda: get_driver(local.uri).vnc_address(uuid), 30)
    assert security_types(address) == [2]  # VNC authentication only: no way in without the proxy's password
    wait_for(lambda: not Machine.objects.get(pk=machine.pk).operation, 30)
    services.machine_power(machine=Machine.objects.get(pk=machine.pk), action="poweroff", actor=staff)
    wait_for(lambda: virsh("domstate", uuid).strip() == "shut off", 60, message="the portal's power off")
    wait_for(lambda: not Machine.objects.get(pk=machine.pk).operation, 30)

    services.machine_delete(machine=Machine.objects.get(pk=machine.pk), actor=staff)  # adopted: disks kept
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60, message="the delete")
    assert get_driver(local.uri).domain_state(uuid) is None  # the domain is gone
    assert handmade["vol"] in virsh("vol-list", "default")  # its disk is not
    assert AuditEvent.objects.filter(action="machine.adopt", outcome="success").count() == 1

"""An AnsiStack inventory imported for real: the Huey worker registers this host's libvirtd from libvirt_hosts
(ansible_connection: local), defines its server_networks, imports the image vm_image_data names by URL from
the test file server, and creates an image machine and a network-boot machine in a lab; a second import of the
same files changes nothing."""

import secrets
import subprocess
from pathlib import Path

import pytest

from hypervisors.models import Hypervisor, Image
from labs.importer import inventory_import_apply, inventory_import_create
from labs.models import InventoryImport, Lab
from machines.models import Machine
from tests.conftest import wait_for
from tests.factories import UserFactory
from tests.images import test_images

pytestmark = pytest.mark.integration


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)


def inventories(network: str, image_url: str) -> tuple[list[dict], dict]:
    # A macvtap network on an interface that does not exist: libvirt defines and starts it, and the
    # network-boot machine on it stays powered off, so nothing ever sends a frame.
    phys = f"""\
all:
  children:
    libvirt_hosts:
      hosts:
        this-host:
          ansible_connection: local
          server_networks:
            {network}:
              interface: asnone0
              type: macvlan
"""
    vms = f"""\
all:
  children:
    all_vms:
      vars:
        vm_virt_host: this-host
        vm_cores: 1
        vm_ram: 256
        vm_disk_size: 1
      children:
        provisioned_vms:
          hosts:
            moved-web:
              vm_image_name: tiny-cloud
        bootable_vms:
          vars:
            vm_networks:
              {network}:
                interface: eth0
          hosts:
            moved-node:
              vm_vbmc_port: 16101
              vm_vbmc_username: admin
              vm_vbmc_password: secrete
"""
    catalogue = f"""\
vm_image_data:
  tiny-cloud:
    url: {image_url}
    access_user: tiny
"""
    files = [{"name": "inventory-phys.yaml", "text": phys}, {"name": "moved-lab.yaml", "text": vms}]
    return files, {"name": "main.yml", "text": catalogue}


def apply(owner, files, vars_file) -> InventoryImport:
    imp = inventory_import_create(actor=owner, owner=owner, files=files, vars_file=vars_file)
    inventory_import_apply(imp=imp, actor=owner)
    return wait_for(
        lambda: (i := InventoryImport.objects.get(pk=imp.pk)).status in ("done", "failed") and i,
        180,
        message="the import did not finish",
    )


def test_an_inventory_imported_twice(worker, libvirtd, file_server):
    owner = UserFactory(username="ansistack-user", is_staff=True)
    network = f"as-{secrets.token_hex(3)}"
    files, vars_file = inventories(network, f"{file_server}/{Path(test_images()['tiny_disk']).name}")
    try:
        imp = apply(owner, files, vars_file)
        assert imp.status == "done", imp.report
        report = "\n".join(imp.report)
        assert "hypervisor this-host: registered (qemu:///system)" in report, report
        assert f"network {network} on this-host: defined" in report, report
        assert "image tiny-cloud: imported from" in report, report
        assert "machine moved-web: created on this-host (image), in lab moved-lab" in report, report
        assert "machine moved-node: created on this-host (network), in lab moved-lab" in report, report
        assert "admin/secrete (1 machines) are replaced by per-machine ones" in report, report
        assert imp.done_steps == imp.total_steps == 5

        web = wait_for(lambda: (m := Machine.objects.get(name="moved-web")).status in ("active", "error") and m, 120)
        node = wait_for(lambda: (m := Machine.objects.get(name="moved-node")).status in ("active", "error") and m, 60)
        assert web.status == "active", web.status_message
        assert node.status == "active", node.status_message
        assert virsh("domstate", str(web.uuid)).stdout.strip() == "running"
        assert virsh("domstate", str(node.uuid)).stdout.strip() == "shut off"
        assert node.nics.get().source == network and node.bmc_username != "admin"
        assert virsh("net-info", network).returncode == 0
        lab = Lab.objects.get(name="moved-lab")
        assert {(m.machine.name, m.group) for m in lab.members.all()} == {
            ("moved-web", "provisioned_vms"),
            ("moved-node", "bootable_vms"),
        }
        assert Image.objects.get(name="tiny-cloud").default_user == "tiny"

        before = (
            Hypervisor.objects.count(),
            Image.objects.count(),
            sorted(Machine.objects.values_list("pk", "status", "hypervisor_id")),
            virsh("net-list", "--all", "--name").stdout,
        )
        again = apply(owner, files, vars_file)
        assert again.status == "done", again.report
        assert again.done_steps == again.total_steps == 0, again.report
        assert "hypervisor this-host: already registered (qemu:///system)" in again.report
        assert "machine moved-web: already there" in again.report
        assert "machine moved-node: already there" in again.report
        after = (
            Hypervisor.objects.count(),
            Image.objects.count(),
            sorted(Machine.objects.values_list("pk", "status", "hypervisor_id")),
            virsh("net-list", "--all", "--name").stdout,
        )
        assert after == before
    finally:
        virsh("net-destroy", network)
        virsh("net-undefine", network)

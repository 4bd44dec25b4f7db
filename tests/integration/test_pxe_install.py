"""A full network install inside a private network namespace.

A private libvirtd (tests/private_libvirtd.py) runs in its own network, mount and PID
namespaces, with an isolated libvirt network whose dnsmasq hands out addresses and serves
TFTP: an iPXE script, the tiny test guest's kernel and its initrd. The portal registers it
as a hypervisor, defines a network-boot machine on that network, and the machine is
powered on over IPMI (ipmitool against the portal's bmc_server): SeaBIOS, iPXE, DHCP,
TFTP, Linux, and the tiny guest's init, which takes a DHCP lease of its own from the same
private dnsmasq. Nothing of it is visible on the host's network.
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from hypervisors import networks
from hypervisors import services as hv_services
from hypervisors.drivers import connections
from hypervisors.models import Hypervisor, HypervisorStatus, PublishedNetwork
from machines import services
from machines.models import Machine
from tests.conftest import ARTIFACTS, serial_log, wait_for
from tests.factories import UserFactory
from tests.images import test_images
from tests.integration.test_network_bmc import ipmi
from tests.private_libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.integration

SUBNET = "192.168.77"
ROUTER = f"{SUBNET}.1"
NETWORK = "pxe-lab"
BRIDGE = "virbr-pxe"
POOL = "pxe-pool"
IPXE_MARKER = "PXE-TEST boot.ipxe fetched over TFTP"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # iPXE's colours, SeaBIOS's screen clears

BOOT_IPXE = f"""#!ipxe
echo {IPXE_MARKER}
kernel tftp://{ROUTER}/vmlinuz console=tty0 console=ttyS0,115200
initrd tftp://{ROUTER}/initrd.img
boot
"""


def pool_xml(path: str) -> str:
    return f"<pool type='dir'><name>{POOL}</name><target><path>{path}</path></target></pool>"


@pytest.fixture
def pxe_lab():
    """The private libvirtd with a TFTP-serving network and a dir pool; everything removed afterwards.

    Requested before `worker`, so it is torn down after it: the worker's clean-up of
    leftover machines still finds this libvirtd running.
    """
    with PrivateLibvirtd.start(name="pxe", log_dir=ARTIFACTS) as lv:
        images = test_images()
        tftp = lv.workdir / "tftp"
        tftp.mkdir(mode=0o755)
        shutil.copyfile(images["tiny_kernel"], tftp / "vmlinuz")
        shutil.copyfile(images["tiny_initrd"], tftp / "initrd.img")
        (tftp / "boot.ipxe").write_text(BOOT_IPXE)
        for f in tftp.iterdir():
            os.chmod(f, 0o644)  # dnsmasq serves TFTP as an unprivileged user
        pool = lv.workdir / "pool"
        lv.define_xml("pool", pool_xml(str(pool)))  # the network is defined through the portal, in the test
        try:
            yield lv
        finally:
            connections.drop_connection(lv.uri)


def domstate(lv: PrivateLibvirtd, machine: Machine) -> str:
    return lv.virsh("domstate", str(machine.uuid), check=False).strip()


def test_pxe_install_over_ipmi_in_a_private_network(pxe_lab, worker, bmc_server):
    lv = pxe_lab
    started = time.monotonic()

    assert BRIDGE not in lv.run_inside("ip", "-br", "addr").stdout  # the portal defines it below
    hv = hv_services.hypervisor_create(name="pxe-lab", uri=lv.uri)
    hv = wait_for(
        lambda: (
            (h := Hypervisor.objects.get(pk=hv.pk)).status in (HypervisorStatus.ONLINE, HypervisorStatus.DOWN) and h
        ),
        60,
    )
    assert hv.status == HypervisorStatus.ONLINE, hv.status_error

    # Staff define the PXE network from the portal: DHCP, a TFTP root and the boot file.
    networks.network_create(
        hypervisor=hv,
        spec=networks.NetworkSpec(
            name=NETWORK,
            mode="isolated",
            bridge=BRIDGE,
            cidr=f"{ROUTER}/24",
            dhcp_start=f"{SUBNET}.100",
            dhcp_end=f"{SUBNET}.200",
            tftp_root=str(lv.workdir / "tftp"),
            boot_file="boot.ipxe",
            ipv6_cidr="fd77::1/64",
        ),
    )
    pk = hv.pk

    def with_network():
        h = Hypervisor.objects.get(pk=pk)
        return h if any(n["name"] == NETWORK and n["active"] for n in h.networks) else None

    hv = wait_for(with_network, 30, message="the portal never defined the network")
    # The lab's network lives in its namespace only.
    inside = lv.run_inside("ip", "-br", "addr").stdout
    assert BRIDGE in inside and f"{ROUTER}/24" in inside, inside
    assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0, (
        "the bridge leaked onto the host"
    )
    net = next(n for n in hv.networks if n["name"] == NETWORK)
    # Defined by the portal, so guarded: its guests reach DHCP, DNS and TFTP of the hypervisor, nothing else of it.
    assert net == {
        "name": NETWORK,
        "active": True,
        "forward_mode": "isolated",
        "bridge": BRIDGE,
        "guard": f"portal-guard-{NETWORK}",
    }
    pool = next(p for p in hv.pools if p["name"] == POOL)
    assert pool["active"] and pool["path"] == str(lv.workdir / "pool")
    print(f"private hypervisor online after {time.monotonic() - started:.1f} s")

    owner = UserFactory(username="installer")
    # A libvirt network is staff's unless published: staff open the PXE network to everyone on this host.
    PublishedNetwork.objects.create(hypervisor=hv, kind="network", source=NETWORK, everyone=True)
    machine = services.machine_create(
        owner=owner,
        hypervisor=hv,
        name="pxe1",
        deploy_type="network",
        memory_mib=256,
        disk_gib=1,
        pool=POOL,
        nics=[services.NicInput(type="network", source=NETWORK)],
    )
    machine = wait_for(lambda: (m := Machine.objects.get(pk=machine.pk)).status in ("active", "error") and m, 60)
    assert machine.status == "active", machine.status_message
    assert machine.power_state == "off" and domstate(lv, machine) == "shut off"
    mac = machine.nics.get().mac

    creds = services.machine_bmc_reveal(machine=machine, actor=owner)
    wait_for(lambda: Machine.objects.get(pk=machine.pk).bmc_listening, 15, message="the BMC never listened")
    assert "Chassis Power is off" in ipmi(creds, "power", "status").stdout
    try:
        powered = time.monotonic()
        assert ipmi(creds, "power", "on").returncode == 0
        wait_for(lambda: domstate(lv, machine) == "running", 15)
        # Nothing leads out of the namespace: its loopback, the lab's bridge and the guest's tap.
        links = {line.split()[0].split("@")[0] for line in lv.run_inside("ip", "-br", "link").stdout.splitlines()}
        assert {"lo", BRIDGE} < links and all(n.startswith("vnet") for n in links - {"lo", BRIDGE}), links

        text = serial_log(machine.pk, "iPXE", IPXE_MARKER, "TINY-GUEST ready", timeout=120)
        print(f"powered on to TINY-GUEST ready in {time.monotonic() - powered:.1f} s")
        (ARTIFACTS / "pxe-install-serial.log").write_text(text)
        for line in text.splitlines():
            if "iPXE" in line or "PXE-TEST" in line or "TINY-GUEST" in line:
                print("  serial:", ANSI.sub("", line).strip())
        # iPXE's own report of the TFTP fetch. A fetch that lasts over a second (a loaded machine) is
        # reported with a counter (a percentage redrawn with backspaces, or dots) before the "ok".
        fetched = re.compile(rf"tftp://{re.escape(ROUTER)}/initrd\.img\.\.\.[ 0-9%.\x08]*ok")
        assert fetched.search(text), text
        assert "TINY-GUEST no-cidata" in text  # no seed: the OS came over the network, not from a CD
        lease = re.search(r"TINY-GUEST net eth0=(\S+)", text)
        assert lease and lease[1].startswith(f"{SUBNET}."), lease  # the private dnsmasq's DHCP
        leases = lv.virsh("net-dhcp-leases", NETWORK)
        assert mac in leases and f"{SUBNET}." in leases, leases
        # The portal shows the address on the machine's NIC, from the network's leases.
        services.hypervisor_reconcile_run(machine.hypervisor_id)
        nic = Machine.objects.get(pk=machine.pk).nics.get()
        assert nic.seen_addresses == [lease[1]], (nic.seen_addresses, lease[1])
    finally:
        ipmi(creds, "power", "off")
    wait_for(lambda: domstate(lv, machine) == "shut off", 30)

    services.machine_delete(machine=Machine.objects.get(pk=machine.pk), actor=machine.owner)
    wait_for(lambda: not Machine.objects.filter(pk=machine.pk).exists(), 60, message="the machine was never deleted")
    assert lv.virsh("list", "--all", "--name").strip() == ""
    assert not [v for v in lv.virsh("vol-list", POOL).split() if str(machine.uuid) in v]
    print(f"whole test {time.monotonic() - started:.1f} s")

"""A lab made from a template on the host's libvirtd, through the real worker and BMC server: two tiny
network-boot machines with their BMCs (defined, off) and one image machine on an isolated network made for the
test, each with its static address from the template; the lab powered off and on from its page, its page read
with every machine's state, its instackenv taken, and the lab deleted with no domain or volume left."""

import subprocess
import time

import pytest
from django.test import Client
from django.urls import reverse

from hypervisors.services import hypervisor_sync
from labs import services
from labs.models import Lab
from machines.models import Machine
from tests.conftest import wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def virsh(*args: str, check: bool = True) -> str:
    done = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def domstate(machine: Machine) -> str:
    return virsh("domstate", str(machine.uuid), check=False).strip()


@pytest.fixture
def lab_network(local, tmp_path):
    """An isolated network (a bridge, no addresses, no dnsmasq) for the lab's NICs, seen by a sync."""
    name, bridge = f"labnet-{int(time.time()) % 100000}", f"vblab{int(time.time()) % 10000}"
    (tmp_path / "net.xml").write_text(f"<network><name>{name}</name><bridge name='{bridge}'/></network>")
    virsh("net-define", str(tmp_path / "net.xml"))
    virsh("net-start", name)
    hypervisor_sync(local.pk)
    yield name
    virsh("net-destroy", name, check=False)
    virsh("net-undefine", name, check=False)


def spec(net: str) -> str:
    return f"""
all:
  vars: {{vm_vbmc_username: admin, vm_vbmc_password: secrete}}
  children:
    all_vms:
      children:
        bootable_vms:
          vars:
            vm_networks:
              {net}: {{interface: eth0, dhcp: false, address: 10.77.0.10, netmask: 24}}
          children:
            metal:
              vars: {{vm_count: 2, vm_cores: 1, vm_ram: 128, vm_disk_size: 1}}
        provisioned_vms:
          vars:
            vm_networks:
              {net}: {{interface: eth0, dhcp: false, address: 10.77.0.50, netmask: 24}}
          children:
            app:
              vars: {{vm_count: 1, vm_cores: 1, vm_ram: 256, vm_disk_size: 1, vm_image_name: tiny}}
"""


def states():
    return {m.name: (m.status, m.power_state, m.operation) for m in Machine.objects.order_by("name")}


def test_a_lab_is_made_powered_read_and_deleted_on_the_hosts_libvirtd(local, tiny_image, bmc_server, lab_network):
    owner = UserFactory(username="lab-owner", is_staff=True)  # staff: a NIC on a network nobody published
    template = services.lab_template_save(actor=owner, name="two-metal-one-app", spec=spec(lab_network))
    page = Client()
    page.force_login(owner)
    t0 = time.monotonic()
    r = page.post(
        reverse("labs:instantiate", args=[template.pk]),
        {
            "name": "itlab",
            "placement": "pack",
            "first": "1",
            "count__metal": "2",
            "pattern__metal": "{lab}-metal-{n}",
            f"offset__metal__{lab_network}": "0",
            "count__app": "1",
            "pattern__app": "{lab}-app-{n}",
            f"offset__app__{lab_network}": "0",
        },
    )
    assert r.status_code == 302, r.content.decode()[-3000:]
    lab = Lab.objects.get(name="itlab")
    wait_for(lambda: all(s == "active" for s, _, _ in states().values()), 120, message=f"not all active: {states()}")
    made = time.monotonic() - t0
    metal1, metal2, app = (Machine.objects.get(name=n) for n in ("itlab-metal-1", "itlab-metal-2", "itlab-app-1"))
    assert [m.nics.get().addresses for m in (metal1, metal2, app)] == [
        ["10.77.0.11/24"],
        ["10.77.0.12/24"],
        ["10.77.0.51/24"],
    ]
    assert domstate(metal1) == "shut off" and domstate(metal2) == "shut off"  # network boot: defined, off
    wait_for(lambda: domstate(app) == "running", 30)
    assert metal1.bmc_username != "admin" and metal1.bmc_port != metal2.bmc_port  # their own BMCs, not admin/secrete
    wait_for(lambda: all(Machine.objects.get(pk=m.pk).bmc_listening for m in (metal1, metal2)), 20)

    body = page.get(reverse("labs:detail", args=[lab.pk])).content.decode()
    assert all(n in body for n in ("itlab-metal-1", "itlab-metal-2", "itlab-app-1", "10.77.0.51/24"))
    assert body.count('href="/machines/') >= 3 and f"/labs/{lab.pk}/inventory.yaml" in body

    t1 = time.monotonic()
    page.post(reverse("labs:power", args=[lab.pk]), {"action": "poweroff"})
    wait_for(lambda: all(domstate(m) == "shut off" for m in (metal1, metal2, app)), 60, message=f"{states()}")
    wait_for(lambda: not any(op for _, _, op in states().values()), 30)
    off = time.monotonic() - t1
    t2 = time.monotonic()
    r = page.post(reverse("labs:power", args=[lab.pk]), {"action": "start"}, follow=True)
    assert b"Start: itlab-app-1, itlab-metal-1, itlab-metal-2." in r.content
    wait_for(lambda: all(domstate(m) == "running" for m in (metal1, metal2, app)), 60, message=f"{states()}")
    wait_for(lambda: all(p == "running" and not op for _, p, op in states().values()), 60, message=f"{states()}")
    on = time.monotonic() - t2
    partial = page.get(reverse("labs:detail", args=[lab.pk]), headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial and partial.count("running") >= 3

    nodes = page.post(reverse("labs:instackenv", args=[lab.pk])).json()["nodes"]
    assert sorted(n["name"] for n in nodes) == ["itlab-metal-1", "itlab-metal-2"]

    t3 = time.monotonic()
    r = page.post(reverse("labs:delete", args=[lab.pk]))
    assert r.status_code == 302 and not Lab.objects.filter(pk=lab.pk).exists()
    wait_for(lambda: not Machine.objects.exists(), 90, message=f"left: {states()}")
    gone = time.monotonic() - t3
    listed = virsh("list", "--all", "--uuid")
    assert not any(str(m.uuid) in listed for m in (metal1, metal2, app))
    volumes = virsh("vol-list", "default")
    assert not any(str(m.uuid) in volumes for m in (metal1, metal2, app))
    print(f"lab made in {made:.1f} s, off in {off:.1f} s, on in {on:.1f} s, deleted in {gone:.1f} s")


@pytest.fixture
def guarded_network(local):
    """An isolated network the portal defines (with its guard), as staff would from the hypervisor page: the
    kind a project may be given (hypervisors.PublishedNetwork)."""
    from hypervisors import networks
    from hypervisors.models import Hypervisor

    name = f"labg-{int(time.time()) % 100000}"
    spec = networks.NetworkSpec(
        name=name, mode="isolated", bridge=f"vblg{int(time.time()) % 10000}", cidr="10.79.0.1/24"
    )
    networks.network_create(hypervisor=local, spec=spec)

    def defined():
        return next(
            (n for n in Hypervisor.objects.get(pk=local.pk).networks if n["name"] == name and n.get("guard")), None
        )

    guard = wait_for(defined, 30, message=f"network {name} not defined with its guard")["guard"]
    yield name
    virsh("net-destroy", name, check=False)
    virsh("net-undefine", name, check=False)
    virsh("nwfilter-undefine", guard, check=False)


@pytest.mark.engines
def test_labs_posted_at_once_never_pass_the_projects_quota_together(local, guarded_network, web_server):
    """Three labs of two machines POSTed at the same moment through gunicorn into a project allowed four
    machines: two are made whole, the third is refused whole, whatever the order."""
    from hypervisors.models import PublishedNetwork
    from machines.models import Project
    from portal.models import ApiToken
    from tests.integration.test_quota_concurrency import _fire, _messages

    owner = UserFactory(username="lab-racer", is_staff=True)  # staff: the project's quota is what counts here
    lab_network = guarded_network
    project = Project.objects.create(name="racers", machines_quota=4)
    # A project's machines follow its members' network rules: the isolated network is published to it.
    PublishedNetwork.objects.create(hypervisor=local, kind="network", source=lab_network).projects.add(project)
    text = (
        f"bootable_vms:\n  vars: {{vm_count: 2, vm_ram: 128, vm_disk_size: 1, vm_networks: {{{lab_network}: {{}}}}}}\n"
    )
    template = services.lab_template_save(actor=owner, name="pair", spec=text)
    _, raw = ApiToken.issue(user=owner)
    bodies = [("/api/v1/labs/", {"template": template.pk, "name": f"race{i}", "project": "racers"}) for i in range(3)]
    results = _fire(web_server, raw, bodies)
    codes = sorted(code for code, _ in results)
    assert codes == [201, 201, 400], results
    refused = next(body for code, body in results if code == 400)
    said = _messages(refused)
    assert "Nothing was made: the lab (2 machines" in said and "6 machines of 4 allowed (using 4)" in said, said
    assert Lab.objects.filter(project=project).count() == 2 and Machine.objects.filter(project=project).count() == 4
    assert all(lab.members.count() == 2 for lab in Lab.objects.filter(project=project))
    wait_for(lambda: all(s == "active" for s, _, _ in states().values()), 120, message=f"{states()}")
    for lab in Lab.objects.filter(project=project):
        services.lab_delete(lab=lab, actor=owner)
    wait_for(lambda: not Machine.objects.exists(), 90, message=f"left: {states()}")

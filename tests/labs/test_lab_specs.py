"""labs.specs: a lab template in AnsiStack's inventory shape, read into machine requests, with clear errors."""

import pytest

from labs import specs

TEMPLATE = """
all:
  vars:
    tripleo_magic_number: 4
    vm_vbmc_username: admin
  children:
    all_vms:
      vars: {vm_cores: 1, vm_ram: 512}
      children:
        bootable_vms:
          vars:
            vm_networks:
              provisioning: {interface: eth0, dhcp: false, address: 192.168.24.10, netmask: 24}
              external: {interface: eth1, dhcp: true}
          children:
            controllers:
              vars: {vm_count: 3, vm_cores: 2, vm_ram: 4096, vm_disk_size: 40}
            computes:
              vars: {vm_count: 2, vm_address_offsets: {provisioning: 10}}
        provisioned_vms:
          children:
            workers:
              vars: {vm_count: 1, vm_image_name: tiny, vm_name_pattern: "w-{n:02d}", vm_protected: true}
"""


def test_groups_inherit_their_parents_vars_and_take_their_deploy_type_from_where_they_are():
    spec = specs.parse(TEMPLATE)
    ctrl, comp, work = spec.groups
    assert (ctrl.name, ctrl.deploy_type, ctrl.count, ctrl.vcpus, ctrl.memory_mib, ctrl.disk_gib) == (
        "controllers",
        "network",
        3,
        2,
        4096,
        40,
    )
    assert (comp.deploy_type, comp.vcpus, comp.memory_mib, comp.disk_gib) == ("network", 1, 512, 10)
    assert [n.network for n in comp.nets] == ["provisioning", "external"] and comp.offsets == {"provisioning": 10}
    assert (work.deploy_type, work.image_name, work.nets, work.protected) == ("image", "tiny", (), True)
    # What the portal reads and does not use is said, never dropped silently.
    assert any(n.startswith("vm_vbmc_username:") for n in spec.notes)
    assert any(n.startswith("tripleo_magic_number:") for n in spec.notes)


def test_requests_name_machines_by_pattern_and_count_addresses_up_from_base_plus_offset():
    reqs = specs.requests(
        specs.parse(TEMPLATE), lab="lab1", counts={"controllers": 2}, patterns={"controllers": "ctrl-{n}"}
    )
    assert [r.name for r in reqs] == ["ctrl-0", "ctrl-1", "lab1-computes-0", "lab1-computes-1", "w-00"]
    addresses = {r.name: r.nics[0].addresses for r in reqs if r.nics}
    assert addresses["ctrl-0"] == ["192.168.24.10/24"] and addresses["ctrl-1"] == ["192.168.24.11/24"]
    assert addresses["lab1-computes-0"] == ["192.168.24.20/24"] and addresses["lab1-computes-1"] == ["192.168.24.21/24"]
    assert reqs[0].nics[0].dhcp4 is False and reqs[0].nics[1].dhcp4 is True and reqs[0].nics[1].addresses == []
    assert reqs[-1].nics is None  # no vm_networks: the portal's default NIC
    offset = specs.requests(specs.parse(TEMPLATE), lab="l", offsets={"controllers": {"provisioning": 100}}, first=1)
    assert offset[0].nics[0].addresses == ["192.168.24.111/24"]  # base + offset + n, n from the first number


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("all: [unclosed", "not valid YAML at line 1"),
        ("- a\n- b", "mapping of groups"),
        ("a: !!python/object:os.system {}", "not valid YAML"),
        (
            "g:\n  vars: {vm_image_name: x, vm_pci_passthrough_devices: [1]}",
            "vm_pci_passthrough_devices is not supported",
        ),
        ("g:\n  vars: {vm_image_name: x, vm_cores: 0}", "vm_cores is a whole number from 1 to 64"),
        ("g:\n  vars: {vm_image_name: x, vm_ram: lots}", "vm_ram is a whole number"),
        ("g:\n  vars: {vm_count: 2}", "give vm_image_name"),
        ("g:\n  hosts: {a: {}}\n  vars: {vm_image_name: x}", "names no hosts"),
        ("g:\n  vars: {vm_image_name: '{{ image }}'}", "Jinja"),
        ("g:\n  vars: {vm_image_name: x, vm_name_pattern: '{lab.__class__}-{n}'}", "only placeholders"),
        ("g:\n  vars: {vm_image_name: x, vm_name_pattern: 'fixed'}", "needs {n}"),
        ("g:\n  vars: {vm_image_name: x, vm_networks: {n1: {address: 10.0.0.1}}}", "netmask"),
        ("g:\n  vars: {vm_image_name: x, vm_networks: {n1: {address: 10.0.0.300/24}}}", "not an address"),
        ("g:\n  vars: {vm_image_name: x, vm_address_offsets: {n9: 1}}", "not in vm_networks"),
        ("bad-name:\n  vars: {vm_image_name: x}", "letters, digits and underscores"),
        ("g:\n  children: {g: {vars: {vm_image_name: x}}}", "appears twice"),
        ("g:\n  vars: {vm_image_name: x, vm_count: 51}", "vm_count"),
        ("g:\n  vars: {vm_image_name: x, vm_protected: maybe}", "vm_protected"),
        ("a: &a {children: {b: *a}}", "appears twice"),
        ("[" * 5000, "not valid YAML"),
        ("g:\n  vars: {vm_image_name: x, when: 2001-13-45}", "not valid YAML"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(text, message):
    with pytest.raises(specs.SpecError) as e:
        specs.parse(text)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"counts": {"nope": 1}}, "no group nope"),
        ({"patterns": {"controllers": "Ctrl_{n}"}}, "not a host name"),
        ({"patterns": {"controllers": "node-{n}", "computes": "node-{n}"}}, "would be made twice"),
        ({"counts": {"controllers": 0, "computes": 0, "workers": 0}}, "no machines"),
        ({"offsets": {"controllers": {"provisioning": 250}}}, "outside 192.168.24.0/24"),
        ({"offsets": {"controllers": {"external": 1}}}, "no address to count from"),
        ({"offsets": {"controllers": {"nowhere": 1}}}, "not in its vm_networks"),
        ({"first": -1}, "first number"),
    ],
)
def test_bad_instantiations_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(specs.SpecError) as e:
        specs.requests(specs.parse(TEMPLATE), lab="lab1", **kwargs)
    assert message in str(e.value)


def test_an_oversized_template_is_refused_before_it_is_parsed():
    with pytest.raises(specs.SpecError, match="over 64 KiB"):
        specs.parse("g:\n  vars: {vm_image_name: x}\n" + "#" * (65 * 1024))

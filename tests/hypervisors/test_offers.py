"""hypervisors.offers: what a synced hypervisor offers, each refusal as the checks give it, the create form's
menu over several hypervisors, and the portal's own choice lists that models, forms and services share.
Plain data over unsaved rows: no database."""

import pytest

from hypervisors import offers
from hypervisors.models import PUBLISHABLE_MODES, Hypervisor
from hypervisors.offers import Menu, either, offers_for
from machines.forms import MACVTAP_MODES, NIC_MODELS
from machines.models import Machine, MachineNic

POOLS = [
    {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 5 << 30},
    {"name": "broken", "active": False, "capacity_bytes": 0, "allocation_bytes": 0, "available_bytes": 0},
]
DEVICES = [
    {"name": "pci_0000_03_00_0", "type": "pci", "vendor": "0x8086", "product": "0x1533", "description": "Intel I210"},
    {"name": "usb_1_2", "type": "usb", "vendor": "0x1234", "product": "0x5678", "description": ""},
]


def synced(**kw) -> Hypervisor:
    fields = dict(
        name="lab",
        arch="x86_64",
        guest_arches=["x86_64", "aarch64"],
        machine_types=["pc", "q35", "pc-q35-7.2", "pc-i440fx-2.0"],
        cpu_modes=["host-model", "custom", "maximum"],
        cpu_models=["qemu64", "Haswell"],
        firmwares=["bios", "efi"],
        pools=POOLS,
        devices=DEVICES,
        networks=[{"name": "default", "active": True}, {"name": "down", "active": False}],
        interfaces=[
            {"name": "br0", "type": "bridge"},
            {"name": "eno1", "type": "ethernet"},
            {"name": "lo", "type": "ethernet"},
        ],
    )
    return Hypervisor(**{**fields, **kw})


@pytest.fixture
def lab():
    return offers_for(synced())


@pytest.fixture
def unreported():
    """A hypervisor whose sync reported none of the lists."""
    return offers_for(
        synced(guest_arches=[], machine_types=[], cpu_modes=[], cpu_models=[], firmwares=[], interfaces=[], devices=[])
    )


def test_what_a_synced_hypervisor_offers(lab):
    assert lab.name == "lab" and lab.arch == "x86_64" and lab.arches == ["x86_64", "aarch64"]
    assert lab.machine_types == ("pc", "q35", "pc-q35-7.2", "pc-i440fx-2.0")  # the sync's order
    assert list(lab.active_pools) == ["default"]
    assert lab.network_names == {"default", "down"} and lab.active_networks == ["default"]
    assert lab.bridges == ["br0"] and lab.macvtap_interfaces == ["eno1"]  # not the bridge, not loopback
    assert [d["name"] for d in lab.free_devices({"usb_1_2"})] == ["pci_0000_03_00_0"]
    assert offers_for(synced(guest_arches=[])).arches == ["x86_64"]  # none reported: its own
    assert offers_for(synced(guest_arches=[], arch="")).arches == []  # none known: no filter


def test_what_it_offers_is_not_refused(lab):
    for ask, value in [
        (lab.refuse_guest_arch, "aarch64"),
        (lab.refuse_firmware, "uefi"),
        (lab.refuse_firmware, "bios"),
        (lab.refuse_machine_type, "pc-q35-7.2"),
        (lab.refuse_cpu_mode, "maximum"),
        (lab.refuse_cpu_model, "Haswell"),
        (lab.refuse_pool, "default"),
        (lab.refuse_network, "down"),
        (lab.refuse_bridge, "br0"),
        (lab.refuse_macvtap, "lo"),
        (lab.refuse_placed_arch, "aarch64"),
        (lab.refuse_placed_arch, ""),
    ]:
        assert ask(value) is None, (ask, value)
    assert lab.refuse_device("usb_1_2", taken=()) is None


@pytest.mark.parametrize(
    ("question", "value", "refusal"),
    [
        ("refuse_guest_arch", "ppc64le", "lab cannot run ppc64le guests (it offers x86_64, aarch64)."),
        (
            "refuse_machine_type",
            "pc-q35-1.0",
            "lab has no machine type 'pc-q35-1.0' (it has e.g. pc, q35, pc-q35-7.2).",
        ),
        (
            "refuse_cpu_mode",
            "host-passthrough",
            "lab supports CPU modes host-model, custom, maximum, not host-passthrough.",
        ),
        ("refuse_cpu_model", "Skylake-Server", "'Skylake-Server' is not a usable CPU model on lab."),
        ("refuse_pool", "broken", "Storage pool 'broken' is not active on lab."),
        ("refuse_pool", "nowhere", "Storage pool 'nowhere' is not active on lab."),
        ("refuse_network", "lan", "network 'lan' does not exist on lab (it has: default, down)."),
        ("refuse_bridge", "eno1", "lab has no bridge 'eno1' (bridges: br0)."),
        ("refuse_macvtap", "eth9", "name a host interface of lab for macvtap (br0, eno1, lo)."),
        ("refuse_macvtap", "", "name a host interface of lab for macvtap (br0, eno1, lo)."),
        ("refuse_placed_arch", "s390x", "x86_64 host that cannot emulate s390x"),
    ],
)
def test_each_refusal(lab, question, value, refusal):
    assert getattr(lab, question)(value) == refusal


def test_firmware_refusals():
    assert (
        offers_for(synced(firmwares=["bios"])).refuse_firmware("uefi")
        == "lab has no UEFI firmware (install OVMF there)."
    )
    assert offers_for(synced(firmwares=["bios"])).refuse_firmware("bios") is None


def test_what_the_sync_did_not_report_is_not_refused(unreported):
    for ask, value in [
        (unreported.refuse_guest_arch, "ppc64le"),
        (unreported.refuse_firmware, "uefi"),
        (unreported.refuse_machine_type, "virt"),
        (unreported.refuse_cpu_mode, "host-passthrough"),
        (unreported.refuse_cpu_model, "anything"),
        (unreported.refuse_bridge, "br9"),
        (unreported.refuse_macvtap, "eth9"),
    ]:
        assert ask(value) is None, (ask, value)
    assert unreported.refuse_macvtap("") == "name a host interface of lab for macvtap."  # still a name is needed
    # Placement is stricter: another architecture only where the host lists it.
    assert unreported.refuse_placed_arch("aarch64") == "x86_64 host that cannot emulate aarch64"
    assert offers_for(synced(arch="", guest_arches=[])).refuse_placed_arch("aarch64") == (
        "unknown host that cannot emulate aarch64"
    )


def test_no_networks_or_bridges():
    bare = offers_for(synced(networks=[], interfaces=[{"name": "eno1", "type": "ethernet"}]))
    assert bare.refuse_network("default") == "network 'default' does not exist on lab (it has: none)."
    assert bare.refuse_bridge("br0") == "lab has no bridge 'br0' (bridges: none)."


def test_host_devices(lab):
    assert lab.refuse_device("pci_0000_99_00_0", taken=()) == "lab has no PCI or USB device 'pci_0000_99_00_0'."
    assert lab.refuse_device("usb_1_2", taken={"usb_1_2"}) == "usb_1_2 is already given to another machine."
    assert lab.match_device("8086:1533", taken=()) == ("pci_0000_03_00_0", None)  # ids as lspci -n shows them
    assert lab.match_device("^usb", taken=()) == ("usb_1_2", None)
    assert lab.match_device("Intel", taken={"pci_0000_03_00_0"}) == ("", "No free device on lab matches 'Intel'.")
    found, why = lab.match_device("(", taken=())
    assert found == "" and why is not None and why.startswith("Not a regular expression: ")


def test_what_placement_asks(lab):
    assert lab.missing_networks(["default", "lan", "down"]) == ["lan"]
    assert lab.pool_free_gib("default") == 5 and lab.pool_free_gib("broken") is None
    assert offers_for(synced(pools=[{"name": "default", "active": True}])).pool_free_gib("default") == 0


def test_the_menu_over_several_hypervisors_offers_what_every_one_has():
    small = synced(
        name="small",
        guest_arches=["x86_64"],
        machine_types=["pc", "q35"],
        cpu_modes=["host-model"],
        cpu_models=[],
        firmwares=["bios"],
        networks=[{"name": "lan"}],
        interfaces=[{"name": "br1", "type": "bridge"}],
        pools=[{"name": "fast", "active": True}],
    )
    menu = Menu.over([synced(), small])
    assert menu.hypervisor is None and menu.devices == []
    assert menu.machine_types == ["pc", "q35"] and menu.cpu_modes == ["host-model"]
    assert menu.cpu_models == ["Haswell", "qemu64"]  # small did not report its models: not asked
    assert menu.uefi is False  # small has no OVMF
    assert menu.arches == ["aarch64", "x86_64"] and menu.networks == ["default", "lan"]
    assert menu.bridges == ["br0", "br1"] and menu.interfaces == ["eno1"] and menu.pools == ["default", "fast"]


def test_the_menu_of_one_hypervisor():
    lab = synced()
    menu = Menu.over([lab], hypervisor=lab, taken={"usb_1_2"})
    assert menu.hypervisor is lab and menu.uefi is True
    assert menu.cpu_modes == ["host-model", "custom"]  # the portal's, in its order: not "maximum"
    assert menu.machine_types == ["pc", "pc-i440fx-2.0", "pc-q35-7.2", "q35"]
    assert [d["name"] for d in menu.devices] == ["pci_0000_03_00_0"]
    assert Menu.over([]).uefi is True and Menu.over([]).machine_types == []


def test_the_choices_are_one_list_each():
    assert either(offers.DISK_BUSES) == "virtio, sata, scsi or ide" and either(["bios"]) == "bios"
    assert either(offers.FIRMWARES) == "bios or uefi"
    field = Machine._meta.get_field
    assert [v for v, _ in field("disk_bus").choices] == list(offers.DISK_BUSES)
    assert [v for v, _ in field("disk_cache").choices] == ["", *offers.DISK_CACHES]
    assert field("firmware").choices == [("bios", "BIOS"), ("uefi", "UEFI")]
    assert [v for v, _ in MachineNic._meta.get_field("model").choices] == list(offers.NIC_MODELS)
    assert [v for v, _ in MachineNic._meta.get_field("mode").choices] == list(offers.MACVTAP_MODES)
    assert [v for v, _ in NIC_MODELS] == list(offers.NIC_MODELS) and NIC_MODELS[1] == ("e1000", "e1000")
    assert [v for v, _ in MACVTAP_MODES] == list(offers.MACVTAP_MODES)
    assert PUBLISHABLE_MODES is offers.PUBLISHABLE_MODES == ("bridge", "vepa", "private")

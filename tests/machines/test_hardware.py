import pytest
from django.core.exceptions import ValidationError

from machines import services
from machines.services import validation
from tests.factories import HypervisorFactory, ImageFactory, UserFactory, tenant_network_entry, tenant_nic

pytestmark = pytest.mark.django_db


@pytest.fixture
def hv(db):
    return HypervisorFactory(
        name="lab",
        uri="qemu:///system",
        arch="x86_64",
        cpus=8,
        memory_mib=16384,
        machine_types=["pc", "pc-i440fx-7.2", "q35", "pc-q35-7.2"],
        cpu_modes=["host-model", "custom"],
        cpu_models=["qemu64", "Haswell-noTSX"],
        networks=[tenant_network_entry()],  # the NIC a plain owner may use (not user-mode)
        pools=[
            {
                "name": "default",
                "active": True,
                "capacity_bytes": 1 << 40,
                "allocation_bytes": 0,
                "available_bytes": 1 << 40,
            }
        ],
    )


def create(hv, owner=None, **hw):
    return services.machine_create(
        owner=owner or UserFactory(username="hw", is_staff=bool(hw.get("hostdevs") or hw.get("hostdev_match"))),
        hypervisor=hv,
        name="metal",
        deploy_type="network",
        vcpus=2,
        nics=[tenant_nic()],
        **hw,
    )


@pytest.mark.parametrize(
    ("hw", "field", "message"),
    [
        ({"machine_type": "pc-q35-1.0"}, "machine_type", "has no machine type"),
        ({"cpu_mode": "host-passthrough"}, "cpu_mode", "supports CPU modes host-model, custom"),
        ({"cpu_mode": "custom"}, "cpu_model", "Name the CPU model"),
        ({"cpu_mode": "custom", "cpu_model": "Skylake-Server"}, "cpu_model", "not a usable CPU model"),
        ({"cpu_model": "qemu64"}, "cpu_model", "goes with CPU mode custom"),
        ({"cpu_topology": [1, 1, 1]}, "cpu_topology", "must equal the 2 vCPUs"),
        ({"cpu_topology": [2, "x", 1]}, "cpu_topology", "three positive whole numbers"),
        ({"smbios": {"colour": "red"}}, "smbios", "Use the keys"),
        ({"extra_disks": [1, 2, 3, 4, 5]}, "extra_disks", "Up to four"),
        ({"disk_bus": "floppy"}, "disk_bus", "Choose virtio"),
        ({"qemu_args": ["-device", "pvpanic"]}, "qemu_args", "Only staff"),
    ],
)
def test_hardware_the_hypervisor_lacks_is_refused(hv, hw, field, message):
    with pytest.raises(ValidationError) as e:
        create(hv, **hw)
    assert message in " ".join(e.value.message_dict[field])


def test_hardware_reaches_the_domain(hv, host, django_capture_on_commit_callbacks, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17300-17309"
    staff = UserFactory(username="root", is_staff=True)
    with django_capture_on_commit_callbacks(execute=True):
        machine = create(
            hv,
            owner=staff,
            machine_type="q35",
            cpu_mode="custom",
            cpu_model="qemu64",
            cpu_topology=[1, 2, 1],
            smbios={"serial": "SN-9"},
            watchdog=True,
            rng=True,
            disk_bus="sata",
            disk_cache="none",
            extra_disks=[2, 3],
            qemu_args=["-no-user-config"],
        )
    machine.refresh_from_db()
    assert machine.status == "active", machine.status_message
    spec = host.domains[str(machine.uuid)]["spec"]
    assert (spec.machine, spec.cpu_mode, spec.cpu_model, spec.topology) == ("q35", "custom", "qemu64", (1, 2, 1))
    assert spec.smbios == {"serial": "SN-9"} and spec.watchdog and spec.rng and spec.qemu_args == ("-no-user-config",)
    assert [(d.bus, d.cache) for d in spec.disks] == [("sata", "none")] * 3
    assert host.pools["default"][machine.extra_disk_volume(1)]["capacity"] == 3 << 30


def test_extra_disks_count_against_the_disk_quota(hv, settings):
    settings.PORTAL_QUOTA_DISK_GIB = 20
    with pytest.raises(ValidationError, match="GiB of disk"):
        create(hv, extra_disks=[8, 8])  # 10 + 16 > 20


@pytest.mark.parametrize(
    ("hw", "field", "message"),
    [
        ({"firmware": "coreboot"}, "firmware", "bios or uefi"),
        ({"secure_boot": True}, "secure_boot", "needs UEFI"),
        ({"firmware": "uefi", "secure_boot": True}, "secure_boot", "q35"),
        ({"firmware": "uefi"}, "firmware", "no UEFI firmware"),
    ],
)
def test_firmware_choices_are_checked(hv, hw, field, message):
    hv.firmwares = ["bios"]
    hv.save()
    with pytest.raises(ValidationError) as e:
        create(hv, **hw)
    assert message in " ".join(e.value.message_dict[field])


def test_an_image_of_an_architecture_the_host_cannot_run_is_refused(hv):
    from hypervisors.models import ImageStatus

    hv.guest_arches = ["i686", "x86_64"]
    hv.save()
    image = ImageFactory(name="ppc", status=ImageStatus.READY, arch="ppc64le", virtual_size_bytes=1)
    with pytest.raises(ValidationError, match="cannot run ppc64le guests"):
        services.machine_create(
            owner=UserFactory(username="a"), hypervisor=hv, name="p", image=image, nics=[tenant_nic()]
        )


def test_an_arm64_machine_gets_emulation_defaults(hv, host, django_capture_on_commit_callbacks, tmp_path, settings):
    import subprocess

    from hypervisors.models import ImageStatus

    settings.PORTAL_IMAGE_DIR = tmp_path
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(tmp_path / "1.qcow2"), "16M"], check=True, capture_output=True
    )
    hv.guest_arches = ["i686", "x86_64", "aarch64"]
    hv.save()
    image = ImageFactory(
        name="arm",
        status=ImageStatus.READY,
        arch="aarch64",
        file_name="1.qcow2",
        sha256="cd" * 32,
        file_size_bytes=(tmp_path / "1.qcow2").stat().st_size,
        virtual_size_bytes=16 << 20,
    )
    with django_capture_on_commit_callbacks(execute=True):
        machine = services.machine_create(
            owner=UserFactory(username="b"), hypervisor=hv, name="arm1", image=image, disk_gib=1, nics=[tenant_nic()]
        )
    spec = host.domains[str(machine.uuid)]["spec"]
    assert (spec.arch, spec.machine, spec.domain_type, spec.cpu_model, spec.firmware, spec.video) == (
        "aarch64",
        "virt",
        "qemu",
        "cortex-a57",
        "efi",
        "virtio",
    )
    assert [d.bus for d in spec.disks] == ["virtio", "scsi"]  # no IDE on virt: the seed goes on virtio-scsi


@pytest.mark.parametrize(
    ("nic", "message"),
    [
        (services.NicInput(type="bridge", source="br9"), "has no bridge 'br9' (bridges: br0)"),
        (services.NicInput(type="direct", source="eth7"), "name a host interface of lab for macvtap (br0, eno1)"),
        (services.NicInput(type="direct", source="eno1", mode="sideways"), "macvtap mode is"),
        (services.NicInput(type="user", model="ne2k"), "model is virtio"),
        (services.NicInput(type="direct", source="eno1", vlan=5000), "VLAN tag is 1 to 4094"),
        (services.NicInput(type="user", vlan=10), "VLAN tag is 1 to 4094, on a bridge"),
    ],
)
def test_nics_must_match_the_hosts_interfaces(hv, nic, message):
    hv.interfaces = [
        {"name": "br0", "type": "bridge", "active": True},
        {"name": "eno1", "type": "ethernet", "active": True},
    ]
    hv.save()
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        # Staff: for others the network policy answers first and tells nothing of the host's interfaces.
        services.machine_create(
            owner=UserFactory(username="n", is_staff=True), hypervisor=hv, name="m", deploy_type="network", nics=[nic]
        )


def test_a_macvtap_nic_with_a_vlan_is_accepted(hv, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17320-17329"
    hv.interfaces = [{"name": "eno1", "type": "ethernet", "active": True}]
    hv.save()
    # Staff: passthrough and VLAN tags are host resources (tests/machines/test_published_networks.py refuses others).
    machine = services.machine_create(
        owner=UserFactory(username="v", is_staff=True),
        hypervisor=hv,
        name="m",
        deploy_type="network",
        nics=[services.NicInput(type="direct", source="eno1", mode="passthrough", vlan=42)],
    )
    nic = machine.nics.get()
    assert (nic.type, nic.source, nic.mode, nic.vlan) == ("direct", "eno1", "passthrough", 42)


DEVICES = [
    {
        "name": "pci_0000_03_00_0",
        "type": "pci",
        "vendor": "0x8086",
        "product": "0x1533",
        "description": "Intel I210",
        "driver": "igb",
        "domain": 0,
        "bus": 3,
        "slot": 0,
        "function": 0,
    },
    {
        "name": "pci_0000_04_00_0",
        "type": "pci",
        "vendor": "0x8086",
        "product": "0x1533",
        "description": "Intel I210",
        "driver": "igb",
        "domain": 0,
        "bus": 4,
        "slot": 0,
        "function": 0,
    },
]


def test_host_devices_by_name_or_pattern_and_never_twice(hv, host, settings, django_capture_on_commit_callbacks):
    settings.PORTAL_BMC_PORT_RANGE = "17330-17339"
    hv.devices = DEVICES
    hv.save()
    owner = UserFactory(username="d", is_staff=True)
    with django_capture_on_commit_callbacks(execute=True):
        first = services.machine_create(
            owner=owner,
            hypervisor=hv,
            name="d1",
            deploy_type="network",
            vcpus=2,
            nics=[tenant_nic()],
            hostdevs=["pci_0000_03_00_0"],
        )
        second = services.machine_create(
            owner=owner,
            hypervisor=hv,
            name="d2",
            deploy_type="network",
            vcpus=2,
            nics=[tenant_nic()],
            hostdev_match=r"8086:1533",
        )
    assert second.hostdevs == ["pci_0000_04_00_0"]  # the first match was taken
    spec = host.domains[str(first.uuid)]["spec"]
    assert [d["bus"] for d in spec.hostdevs] == [3]
    with pytest.raises(ValidationError, match="already given to another machine"):
        create(hv, hostdevs=["pci_0000_03_00_0"])
    with pytest.raises(ValidationError, match="No free device"):
        create(hv, hostdev_match="8086")
    with pytest.raises(ValidationError, match="no PCI or USB device"):
        create(hv, hostdevs=["pci_9999"])


def test_boot_order_puts_asked_disks_first():
    from hypervisors.drivers.base import DiskSpec
    from machines.provisioning import boot_order

    main, extra, cd = DiskSpec(path="/m"), DiskSpec(path="/x", boot_order=1), DiskSpec(path="/c", device="cdrom")
    blank = DiskSpec(path="/b")
    ordered = boot_order([main, extra, blank, cd], main, cd)
    assert [(d.path, d.boot_order) for d in ordered] == [("/m", 2), ("/x", 1), ("/b", None), ("/c", 3)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([{"size_gib": 1, "image": 999}], "not a ready disk image"),
        ([{"size_gib": 1, "colour": "red"}], "a size in GiB"),
        ([{"size_gib": 1, "boot_order": 1}], "boot from the network"),
    ],
)
def test_bad_extra_disks_are_refused(hv, extra, message):
    with pytest.raises(ValidationError, match=message):
        create(hv, extra_disks=extra)


def test_boot_orders_of_extra_disks_are_distinct():
    with pytest.raises(ValidationError, match="distinct positive"):
        validation._normalise_extra_disks([{"size_gib": 1, "boot_order": 1}, {"size_gib": 1, "boot_order": 1}], "iso")
    assert validation._normalise_extra_disks([3, {"size_gib": 1, "boot_order": 2}], "iso") == [
        {"size_gib": 3, "image": None, "boot_order": None},
        {"size_gib": 1, "image": None, "boot_order": 2},
    ]


def test_host_devices_are_for_staff_unless_everyone_may(hv, host, settings):
    hv.devices = DEVICES
    hv.save()
    with pytest.raises(ValidationError, match="Only staff may pass host devices through"):
        create(hv, owner=UserFactory(username="plain"), hostdev_match="8086")
    settings.PORTAL_HOST_DEVICES_FOR = "everyone"
    assert create(hv, owner=UserFactory(username="trusted"), hostdev_match="8086").hostdevs == ["pci_0000_03_00_0"]

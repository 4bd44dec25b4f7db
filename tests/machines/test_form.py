"""The create form offers what the chosen hypervisor has, and carries every hardware option to the service."""

import pytest
from django.urls import reverse

from hypervisors.models import ImageStatus
from machines.forms import MachineForm, Offer
from machines.models import Machine
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, UserFactory

pytestmark = pytest.mark.django_db

POOLS = [
    {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40},
    {"name": "fast", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40},
    {"name": "broken", "active": False, "capacity_bytes": 0, "allocation_bytes": 0, "available_bytes": 0},
]
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
        "name": "usb_1_2",
        "type": "usb",
        "vendor": "0x1234",
        "product": "0x5678",
        "description": "",
        "bus": 1,
        "device": 2,
    },
]


@pytest.fixture
def lab(db):
    return HypervisorFactory(
        name="lab",
        uri="qemu:///system",
        arch="x86_64",
        cpus=8,
        memory_mib=16384,
        guest_arches=["x86_64", "aarch64"],
        machine_types=["pc", "q35", "pc-q35-7.2"],
        cpu_modes=["host-passthrough", "host-model", "custom", "maximum"],
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


@pytest.fixture
def small(db):
    return HypervisorFactory(
        name="small",
        uri="qemu+ssh://small/system",
        arch="x86_64",
        cpus=2,
        memory_mib=4096,
        guest_arches=["x86_64"],
        machine_types=["pc", "q35"],
        cpu_modes=["host-model"],
        cpu_models=["qemu64"],
        firmwares=["bios"],
        pools=POOLS[:1],
        networks=[{"name": "lan", "active": True}],
        interfaces=[{"name": "br1", "type": "bridge"}],
    )


@pytest.fixture
def images(db):
    common = {"status": ImageStatus.READY, "virtual_size_bytes": 1 << 30}
    return [
        ImageFactory(name="debian", arch="x86_64", **common),
        ImageFactory(name="debian-arm", arch="aarch64", **common),
        ImageFactory(name="fedora-s390", arch="s390x", **common),
    ]


def values(form, name):
    out = []
    for value, label in form.fields[name].choices:
        out += [v for v, _ in label] if isinstance(label, list) else [value]
    return [str(v) for v in out if v != ""]


def test_one_hypervisor_offers_what_it_has(lab, images):
    MachineFactory(name="has-nic", owner=UserFactory(), hypervisor=lab, deploy_type="network", hostdevs=["usb_1_2"])
    form = MachineForm(initial={"hypervisor": lab.pk}, user=UserFactory(username="u", is_staff=True))
    assert values(form, "machine_type") == ["pc", "pc-q35-7.2", "q35"]
    assert values(form, "cpu_mode") == [
        "host-passthrough",
        "host-model",
        "custom",
    ]  # not "maximum": the portal has no use
    assert values(form, "cpu_model") == ["Haswell", "qemu64"]
    assert values(form, "firmware") == ["bios", "uefi"]
    assert values(form, "pool") == ["default", "fast"]  # not the inactive one
    assert values(form, "nic") == ["user:", "network:default", "bridge:br0", "direct:eno1"]
    assert values(form, "hostdevs") == ["pci_0000_03_00_0"]  # the USB device is taken
    assert [i.name for i in form.fields["image"].queryset] == ["debian", "debian-arm"]  # no s390x here
    plain = MachineForm(initial={"hypervisor": lab.pk}, user=UserFactory(username="plain"))
    assert {"qemu_args_text", "hostdevs", "hostdev_match"}.isdisjoint(plain.fields)  # staff only


def test_any_hypervisor_offers_what_every_one_has(lab, small, images):
    form = MachineForm(user=UserFactory(username="u", is_staff=True))
    assert values(form, "machine_type") == ["pc", "q35"] and values(form, "cpu_mode") == ["host-model"]
    assert values(form, "firmware") == ["bios"]  # small has no OVMF
    assert values(form, "nic") == ["user:", "network:default", "network:lan", "bridge:br0", "bridge:br1", "direct:eno1"]
    assert values(form, "hostdevs") == [] and "qemu_args_text" in form.fields
    assert Offer.of(None).arches == ["aarch64", "x86_64"]


def test_a_choice_the_hypervisor_lacks_is_refused(small):
    form = MachineForm(
        {
            "deploy_type": "network",
            "name": "m1",
            "hypervisor": small.pk,
            "vcpus": 1,
            "memory_mib": 256,
            "disk_gib": 1,
            "pool": "default",
            "nic": "bridge:br0",
            "machine_type": "pc-q35-7.2",
            "firmware": "uefi",
            "disk_bus": "virtio",
        },
        user=UserFactory(username="u"),
    )
    assert not form.is_valid()
    assert set(form.errors) == {"nic", "machine_type", "firmware"}, form.errors


def test_picking_a_hypervisor_brings_its_choices_and_keeps_what_was_typed(staff_client, lab, small):
    r = staff_client.post(
        reverse("machines:form-fields"),
        {"hypervisor": small.pk, "name": "typed-name", "script": "echo <kept>", "nic": "network:lan", "watchdog": "on"},
    )
    html = r.content.decode()
    assert r.status_code == 200 and html.lstrip().startswith('<div class="row g-4" id="form-body">')
    assert 'value="typed-name"' in html and "echo &lt;kept&gt;</textarea>" in html
    assert '<option value="network:lan" selected>' in html and "bridge:br0" not in html
    assert 'name="watchdog" id="id_watchdog" checked' in html
    assert "small has no free PCI or USB device" in html
    html = staff_client.post(reverse("machines:form-fields"), {"hypervisor": lab.pk}).content.decode()
    assert "pci_0000_03_00_0 · Intel I210 (8086:1533)" in html and 'value="uefi"' in html


def test_the_form_carries_every_hardware_option(
    lab, images, client, host, django_capture_on_commit_callbacks, settings
):
    settings.PORTAL_BMC_PORT_RANGE = "17340-17349"
    staff = UserFactory(username="root", is_staff=True)
    client.force_login(staff)
    data = {
        "deploy_type": "image",
        "name": "full",
        "hypervisor": lab.pk,
        "image": images[0].pk,
        "vcpus": 4,
        "memory_mib": 512,
        "disk_gib": 2,
        "pool": "fast",
        "nic": "direct:eno1",
        "nic_mode": "vepa",
        "nic_vlan": 7,
        "nic_model": "e1000e",
        "machine_type": "q35",
        "cpu_mode": "custom",
        "cpu_model": "Haswell",
        "cpu_sockets": 1,
        "cpu_cores": 2,
        "cpu_threads": 2,
        "firmware": "uefi",
        "secure_boot": "on",
        "disk_bus": "virtio",
        "disk_cache": "none",
        "extra_disks_text": "3 5",
        "smbios_text": "manufacturer=Acme\nserial=SN-1",
        "hostdevs": ["pci_0000_03_00_0"],
        "hostdev_match": "1234:5678",
        "qemu_args_text": "-device pvpanic",
        "watchdog": "on",
        "autostart": "on",
    }
    with django_capture_on_commit_callbacks(execute=True):
        r = client.post(reverse("machines:create"), data)
    assert r.status_code == 302, r.content.decode()[:3000]
    m = Machine.objects.get(name="full")
    nic = m.nics.get()
    assert (nic.type, nic.source, nic.mode, nic.vlan, nic.model) == ("direct", "eno1", "vepa", 7, "e1000e")
    assert (m.pool, m.machine_type, m.cpu_mode, m.cpu_model, m.cpu_topology) == (
        "fast",
        "q35",
        "custom",
        "Haswell",
        [1, 2, 2],
    )
    assert (m.firmware, m.secure_boot, m.disk_cache, m.watchdog) == ("uefi", True, "none", True)
    assert [d["size_gib"] for d in m.extra_disks] == [3, 5] and m.smbios == {"manufacturer": "Acme", "serial": "SN-1"}
    assert m.hostdevs == ["pci_0000_03_00_0", "usb_1_2"] and m.qemu_args == ["-device", "pvpanic"]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"cpu_sockets": 2}, "cpu_sockets", "or none of them"),
        (
            {"cpu_sockets": 3, "cpu_cores": 1, "cpu_threads": 1},
            "cpu_sockets",
            "must equal the 2 vCPUs",
        ),  # from the service
        ({"smbios_text": "Acme"}, "smbios_text", "key=value"),
        ({"smbios_text": "colour=red"}, "smbios_text", "Use the keys"),  # from the service
        ({"extra_disks_text": "10 big"}, "extra_disks_text", "whole GiB"),
        ({"nic": "user:", "nic_vlan": 5}, "nic_vlan", "goes with a host bridge"),
    ],
)
def test_bad_hardware_input_lands_on_its_field(lab, user_client, host, change, field, message):
    data = {
        "deploy_type": "network",
        "name": "bad1",
        "hypervisor": lab.pk,
        "vcpus": 2,
        "memory_mib": 256,
        "disk_gib": 1,
        "pool": "default",
        "nic": "network:default",
        "firmware": "bios",
        "disk_bus": "virtio",
        **change,
    }
    r = user_client.post(reverse("machines:create"), data)
    assert r.status_code == 200 and not Machine.objects.filter(name="bad1").exists()
    errors = r.context["form"].errors
    assert field in errors and message in " ".join(errors[field]), errors


def test_a_pattern_no_free_device_matches_is_refused_on_its_field(lab, staff_client, host):
    data = {
        "deploy_type": "network",
        "name": "bad2",
        "hypervisor": lab.pk,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 1,
        "pool": "default",
        "nic": "user:",
        "firmware": "bios",
        "disk_bus": "virtio",
        "hostdev_match": "dead:beef",
    }
    r = staff_client.post(reverse("machines:create"), data)
    assert "No free device on lab" in " ".join(r.context["form"].errors["hostdev_match"])


def test_a_choice_the_new_hypervisor_lacks_falls_back_and_the_form_says_so(staff_client, lab, small, images):
    html = staff_client.post(
        reverse("machines:form-fields"),
        {"hypervisor": small.pk, "nic": "direct:eno1", "firmware": "uefi", "image": images[1].pk, "pool": "fast"},
    ).content.decode()
    assert 'id="form-dropped"' in html
    for note in (
        "Network eno1 is not offered on small",
        "Firmware uefi is not offered on small",
        "Image debian-arm is not offered on small",
        "Storage pool fast is not offered on small",
    ):
        assert note in html, note
    assert '<option value="user:" selected>' in html  # user-mode, never "no network" by accident


def test_any_hypervisor_ignores_lists_a_hypervisor_never_reported(lab, images):
    HypervisorFactory(name="fresh", uri="qemu+ssh://fresh/system")  # online, nothing synced yet
    form = MachineForm(user=UserFactory(username="u"))
    assert values(form, "machine_type") == ["pc", "pc-q35-7.2", "q35"] and values(form, "firmware") == ["bios", "uefi"]


def test_redraw_with_odd_values_never_fails_and_says_what_was_left_out(staff_client, lab, small):
    MachineFactory(
        name="holder", owner=UserFactory(username="h"), hypervisor=lab, deploy_type="network", hostdevs=["usb_1_2"]
    )
    r = staff_client.post(
        reverse("machines:form-fields"),
        {"hypervisor": lab.pk, "image": "abc", "pool": "nowhere", "hostdevs": ["pci_0000_03_00_0", "usb_1_2"]},
    )
    html = r.content.decode()
    assert r.status_code == 200 and "Image abc is not offered on lab" in html
    assert "Storage pool nowhere is not offered on lab; it is back to default." in html
    assert "Host devices usb_1_2 are not free on lab; they are left out." in html
    assert '<option value="pci_0000_03_00_0" selected>' in html

"""No input answers 500 (issue 14): every parse of user input refuses what it cannot read with a 400 and a
message, and one MAC rule holds for every deploy type and every entry point (the form, the API, the model,
the services): well-formed, unicast, normalised, unique."""

import json

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from rest_framework.test import APIClient

from hypervisors.models import Hypervisor, ImageStatus
from machines import cloudinit, macs
from machines.models import Machine, MachineNic
from portal import sshkeys
from portal.models import ApiToken
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, UserFactory

pytestmark = pytest.mark.django_db

POOL = {"name": "default", "active": True, "capacity_bytes": 1 << 40, "allocation_bytes": 0, "available_bytes": 1 << 40}
DEEP_FLOW = "#cloud-config\na: " + "[" * 5000 + "]" * 5000
DEEP_BLOCK = "#cloud-config\n" + "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v"
BIG_INT = "#cloud-config\nswap: " + "9" * 5000
BAD_DATE = "#cloud-config\nnot_before: 2001-13-01"
GOOD_MAC_TYPED = "52-54-00-AB-CD-EF"
GOOD_MAC = "52:54:00:ab:cd:ef"


@pytest.fixture
def lab(db, settings):
    settings.PORTAL_BMC_PORT_RANGE = "17360-17369"
    return HypervisorFactory(
        name="lab",
        uri="qemu:///system",
        arch="x86_64",
        guest_arches=["x86_64"],
        firmwares=["bios"],
        pools=[POOL],
        networks=[{"name": "default", "active": True}],
    )


@pytest.fixture
def disk(db):
    return ImageFactory(name="debian", arch="x86_64", status=ImageStatus.READY, virtual_size_bytes=1 << 30)


@pytest.fixture
def iso(db):
    return ImageFactory(name="installer", kind="iso", format="iso", status=ImageStatus.READY)


@pytest.fixture
def staff_api(db):
    _, raw = ApiToken.issue(user=UserFactory(username="boss", is_staff=True))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return api


def body(kind: str, disk, iso, name: str = "m1", **extra) -> dict:
    image = {"image": disk.pk} if kind == "image" else {"image": iso.pk} if kind == "iso" else {}
    base = {"name": name, "deploy_type": kind, "hypervisor": "lab", "vcpus": 1, "memory_mib": 256, "disk_gib": 2}
    return {**base, **image, **extra}


def nic(mac: str = "") -> dict:
    return {"type": "network", "source": "default", "mac": mac}


# --- the MAC rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("52:54:00:ab:cd:ef", GOOD_MAC),
        (GOOD_MAC_TYPED, GOOD_MAC),
        ("525400ABCDEF", GOOD_MAC),
        (" 02:00:00:00:00:01 ", "02:00:00:00:00:01"),
    ],
)
def test_a_mac_is_normalised(typed, stored):
    assert macs.normalise_mac(typed) == stored


@pytest.mark.parametrize(
    ("typed", "why"),
    [
        ("01:00:5e:00:00:01", "is a multicast address"),
        ("33:33:00:00:00:01", "is a multicast address"),  # IPv6 multicast
        ("ff:ff:ff:ff:ff:ff", "is the broadcast address"),
        ("00:00:00:00:00:00", "all zeros"),
        ("52:54:00:ab:cd", "is not valid"),
        ("52:54:00:ab:cd:eg", "is not valid"),
        ("52:54-00:ab:cd:ef", "is not valid"),  # separators mixed
        ("52:54:00:ab:cd:ef:01", "is not valid"),
        ("５２:54:00:ab:cd:ef", "is not valid"),  # full-width digits
        ("", "is not valid"),
    ],
)
def test_a_mac_no_nic_may_have_is_refused_with_the_reason(typed, why):
    with pytest.raises(macs.InvalidMac, match=why):
        macs.normalise_mac(typed)


BAD_MACS = [
    ("01:00:5e:00:00:01", "multicast"),
    ("ff:ff:ff:ff:ff:ff", "broadcast"),
    ("52:54:00:zz:00:01", "is not valid"),
]


@pytest.mark.parametrize("kind", ["image", "iso", "network"])
@pytest.mark.parametrize(("mac", "why"), BAD_MACS)
def test_the_api_refuses_a_bad_mac_for_every_deploy_type(staff_api, lab, disk, iso, kind, mac, why):
    r = staff_api.post("/api/v1/machines/", body(kind, disk, iso, nics=[nic(mac)]), format="json")
    assert r.status_code == 400 and why in json.dumps(r.json()), r.content
    assert not Machine.objects.exists()


@pytest.mark.parametrize("kind", ["image", "iso", "network"])
def test_the_api_stores_a_mac_normalised_and_keeps_it_unique(staff_api, lab, disk, iso, kind):
    r = staff_api.post("/api/v1/machines/", body(kind, disk, iso, nics=[nic(GOOD_MAC_TYPED)]), format="json")
    assert r.status_code == 201, r.content
    assert MachineNic.objects.get().mac == GOOD_MAC
    again = body(kind, disk, iso, name="m2", nics=[nic(GOOD_MAC.upper())])
    r = staff_api.post("/api/v1/machines/", again, format="json")
    assert r.status_code == 400 and "52:54:00:ab:cd:ef is already used by another machine" in r.json()["nics"][0]
    twice = body(kind, disk, iso, name="m3", nics=[nic("52:54:00:00:00:07"), nic("52-54-00-00-00-07")])
    r = staff_api.post("/api/v1/machines/", twice, format="json")
    assert r.status_code == 400 and "NIC 2: MAC address 52:54:00:00:00:07 is also NIC 1's" in r.json()["nics"][0]
    assert Machine.objects.count() == 1


def form_data(kind: str, disk, iso, **extra) -> dict:
    image = {"image": disk.pk} if kind == "image" else {"image": iso.pk} if kind == "iso" else {}
    return {
        "deploy_type": kind,
        "name": "f1",
        "hypervisor": Hypervisor.objects.get(name="lab").pk,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "pool": "default",
        "nic": "network:default",
        "firmware": "bios",
        "disk_bus": "virtio",
        **image,
        **extra,
    }


@pytest.mark.parametrize("kind", ["image", "iso", "network"])
def test_the_form_refuses_a_bad_mac_and_stores_a_good_one_normalised(staff_client, lab, disk, iso, host, kind):
    for mac, why in BAD_MACS:
        r = staff_client.post(reverse("machines:create"), form_data(kind, disk, iso, nic_mac=mac))
        assert r.status_code == 200 and why in " ".join(r.context["form"].errors.get("nic_mac", [])), mac
    r = staff_client.post(reverse("machines:create"), form_data(kind, disk, iso, nic_mac=GOOD_MAC_TYPED))
    assert r.status_code == 302, r.context["form"].errors if r.context else r
    assert Machine.objects.get(name="f1").nics.get().mac == GOOD_MAC
    r = staff_client.post(reverse("machines:create"), form_data(kind, disk, iso, name="f2", nic_mac=GOOD_MAC))
    assert r.status_code == 200 and "is already used by another machine" in r.content.decode()
    assert not Machine.objects.filter(name="f2").exists()


def test_the_model_holds_the_rule_for_whatever_checks_a_nic(lab):
    machine = MachineFactory(name="m", owner=UserFactory(), hypervisor=lab, deploy_type="network")
    with pytest.raises(ValidationError, match="multicast"):
        MachineNic(machine=machine, index=0, mac="03:00:00:00:00:01").full_clean()
    MachineNic(machine=machine, index=0, mac="52:54:00:00:00:09").full_clean()


# --- parse failures are 400s with a message -----------------------------------------------------------


@pytest.mark.parametrize(
    ("user_data", "message"),
    [
        (DEEP_FLOW, "nests deeper than 32 levels"),
        (DEEP_BLOCK, "nests deeper than 32 levels"),
        (BIG_INT, "an integer of more than 4,300 digits"),
        (BAD_DATE, "month must be in 1..12"),
    ],
    ids=["deep-flow", "deep-block", "big-int", "bad-date"],
)
def test_user_data_that_cannot_be_read_is_a_400_in_the_api_and_an_error_on_the_form(
    staff_api, staff_client, lab, disk, iso, host, user_data, message
):
    with pytest.raises(cloudinit.CloudInitError, match=message):
        cloudinit.validate_user_data(user_data)
    r = staff_api.post("/api/v1/machines/", body("image", disk, iso, user_data=user_data), format="json")
    assert r.status_code == 400 and message in json.dumps(r.json()), r.content
    r = staff_client.post(reverse("machines:create"), form_data("image", disk, iso, user_data=user_data))
    assert r.status_code == 200 and message in r.content.decode()
    preview = staff_client.post(reverse("machines:preview"), form_data("image", disk, iso, user_data=user_data))
    assert preview.status_code == 200 and message in preview.content.decode()
    assert not Machine.objects.exists()


def test_user_data_as_deep_as_real_cloud_config_still_works():
    data = cloudinit.validate_user_data(
        "#cloud-config\nwrite_files:\n- path: /etc/x\n  content: |\n    hi\nusers:\n- name: a\n  groups: [x]\n"
        + "a:"
        + "".join(f"\n{' ' * i}b{i}:" for i in range(1, 30))
        + " 1\n"
    )
    assert data["users"][0]["groups"] == ["x"]


@pytest.mark.parametrize("depth", [40, 100_000])
def test_a_json_body_nested_too_deep_is_a_400_on_any_endpoint(staff_api, lab, depth):
    deep = "[" * depth + "]" * depth
    r = staff_api.generic("POST", "/api/v1/machines/", f'{{"name": "x", "extra_disks": {deep}}}', "application/json")
    assert r.status_code == 400 and "nested deeper than 32 levels" in r.json()["detail"]
    r = staff_api.generic("POST", "/api/v1/hypervisors/", deep, "application/json")
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"cpu_topology": 5}, "cpu_topology", "Give a list [sockets, cores, threads]"),
        ({"smbios": ["serial"]}, "smbios", "Give an object"),
        ({"extra_disks": {"size_gib": 1}}, "extra_disks", "Give a list"),
        ({"extra_disks": [True]}, "extra_disks", "a size of 1 to 16384 GiB"),
        ({"extra_disks": [{"size_gib": 1, "image": 10**30}]}, "extra_disks", "is not a ready disk image"),
        ({"extra_disks": [{"size_gib": 1, "boot_order": 10**30}]}, "extra_disks", "boot orders"),
        ({"hostdevs": 5}, "hostdevs", "Give a list of device names"),
        ({"hostdevs": [["pci"]]}, "hostdevs", "Give a list of device names"),
        ({"qemu_args": {"-device": "x"}}, "qemu_args", "Give a list of arguments"),
        ({"ssh_authorized_keys": ["ssh-ed25519 AAAAé"]}, "", "not valid base64"),
        ({"vcpus": 10**30}, "vcpus", ""),
        ({"nics": [{"type": "network", "source": "default", "mac": ["52:54:00:00:00:01"]}]}, "nics", ""),
        ({"nics": [{"type": "network", "source": "default", "addresses": ["10.0.0.1/99"]}]}, "", "is not an address"),
    ],
)
def test_json_fields_of_the_wrong_shape_are_a_400_on_their_field(staff_api, lab, disk, iso, change, field, message):
    r = staff_api.post("/api/v1/machines/", body("image", disk, iso, **change), format="json")
    assert r.status_code == 400, r.content
    errors = json.dumps(r.json())
    assert (not field or field in r.json()) and message in errors, errors
    assert not Machine.objects.exists()


def test_an_ssh_key_with_characters_outside_ascii_is_refused_not_a_500(user_client):
    with pytest.raises(sshkeys.InvalidSSHKey, match="not valid base64"):
        sshkeys.validate_ssh_key("ssh-ed25519 AAAAé me@laptop")
    r = user_client.post("/account/keys/", {"name": "k", "public_key": "ssh-ed25519 AAAAé me@laptop"})
    assert r.status_code == 200 and "not valid base64" in r.content.decode()


@pytest.mark.parametrize("sizes", ["9" * 5000, "²", "١٠"])
def test_extra_disk_sizes_on_the_form_are_ascii_whole_numbers(staff_client, lab, disk, iso, host, sizes):
    r = staff_client.post(reverse("machines:create"), form_data("network", disk, iso, extra_disks_text=sizes))
    assert r.status_code == 200 and "whole GiB" in " ".join(r.context["form"].errors["extra_disks_text"])

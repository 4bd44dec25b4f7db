"""Issue 11 item 3: host bridges, host interfaces (macvtap in every mode), VLAN tags and libvirt networks are
the hypervisor's own. Users who are not staff get the tenant network and what staff published to them (or to
the project the machine is made in); user-mode networking and macvtap passthrough are for staff only. The
service refuses the rest naming the rule, for the API and the form alike; the form offers only what is allowed.
"""

import io

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from hypervisors.models import ImageStatus, PublishedNetwork
from machines.forms import MachineForm
from machines.models import Machine, Membership
from portal.models import AuditEvent
from tests.factories import (
    HypervisorFactory,
    ImageFactory,
    MachineFactory,
    ProjectFactory,
    PublishedNetworkFactory,
    UserFactory,
    tenant_network_entry,
)

pytestmark = pytest.mark.django_db

TENANT = settings.PORTAL_TENANT_NETWORK
POOLS = [
    {"name": "default", "active": True, "capacity_bytes": 1 << 42, "allocation_bytes": 0, "available_bytes": 1 << 42}
]
INTERFACES = [
    {"name": "br0", "type": "bridge"},
    {"name": "br-trunk", "type": "bridge"},
    {"name": "eno1", "type": "ethernet"},
    {"name": "lo", "type": "ethernet"},
]


def host(name, *, tenant=True, **kw):
    networks = [{"name": "default", "active": True}, {"name": "lan", "active": True, "guard": "portal-guard-lan"}]
    return HypervisorFactory(
        name=name,
        uri="qemu:///system",
        arch="x86_64",
        cpus=16,
        memory_mib=65536,
        pools=POOLS,
        interfaces=INTERFACES,
        networks=networks + ([tenant_network_entry()] if tenant else []),
        **kw,
    )


@pytest.fixture(autouse=True)
def bmc_ports(settings):
    settings.PORTAL_BMC_PORT_RANGE = "17400-17499"


@pytest.fixture
def lab(db):
    return host("lab")


@pytest.fixture
def bare(db):
    """A hypervisor without the tenant network."""
    return host("bare", tenant=False)


@pytest.fixture
def iso(db):
    return ImageFactory(name="installer", kind="iso", format="iso", status=ImageStatus.READY)


def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def post_machine(user, hypervisor, name="m1", **body):
    body = {
        "name": name,
        "deploy_type": "network",
        "hypervisor": hypervisor.name if hypervisor else None,
        "memory_mib": 256,
        "disk_gib": 1,
        **body,
    }
    return api(user).post("/api/v1/machines/", body, format="json")


def refused(r, message: str) -> None:
    assert r.status_code == 400, r.content
    assert message in " ".join(r.json()["nics"]), r.json()


# --- refused for users who are not staff, each host resource with its own rule -----------------------------

NOT_PUBLISHED = "is not published to you on lab; ask staff to publish it (Admin → Published networks)."


@pytest.mark.parametrize(
    ("nic", "message"),
    [
        (
            {"type": "user"},
            "NIC 1: user-mode networking is for staff only: QEMU maps lab's own loopback into the guest",
        ),
        ({"type": "bridge", "source": "br0"}, f"NIC 1: host bridge br0 {NOT_PUBLISHED}"),
        ({"type": "direct", "source": "eno1", "mode": "bridge"}, f"NIC 1: host interface eno1 {NOT_PUBLISHED}"),
        ({"type": "direct", "source": "eno1", "mode": "vepa"}, f"NIC 1: host interface eno1 {NOT_PUBLISHED}"),
        ({"type": "direct", "source": "eno1", "mode": "private"}, f"NIC 1: host interface eno1 {NOT_PUBLISHED}"),
        (
            {"type": "direct", "source": "eno1", "mode": "passthrough"},
            "NIC 1: macvtap passthrough hands lab's interface eno1",
        ),
        ({"type": "bridge", "source": "br0", "vlan": 10}, f"NIC 1: host bridge br0 {NOT_PUBLISHED}"),
        ({"type": "direct", "source": "eno1", "vlan": 10}, f"NIC 1: host interface eno1 {NOT_PUBLISHED}"),
        ({"type": "network", "source": "lan"}, f"NIC 1: libvirt network lan {NOT_PUBLISHED}"),
    ],
)
def test_a_plain_user_is_refused_every_host_resource_through_the_api(lab, nic, message):
    r = post_machine(UserFactory(username="plain"), lab, nics=[{"type": "network", "source": TENANT}, nic])
    refused(r, message.replace("NIC 1", "NIC 2"))
    assert not Machine.objects.exists()


def test_passthrough_is_refused_even_on_an_interface_published_with_every_mode(lab):
    PublishedNetworkFactory(kind="direct", source="eno1", modes=["bridge", "vepa", "private"])
    r = post_machine(
        UserFactory(username="plain"), lab, nics=[{"type": "direct", "source": "eno1", "mode": "passthrough"}]
    )
    refused(r, "it is for staff only and is never published")


def test_a_published_network_allows_only_its_modes_and_vlan_tags(lab):
    user = UserFactory(username="plain")
    PublishedNetworkFactory(kind="direct", source="eno1", modes=["bridge"], vlans=[100])
    PublishedNetworkFactory(kind="bridge", source="br-trunk", vlans=[20, 10], untagged=False)
    PublishedNetworkFactory(kind="bridge", source="br0")
    cases = [
        (
            {"type": "direct", "source": "eno1", "mode": "vepa"},
            "NIC 1: macvtap mode vepa is not published on host interface eno1 on lab (allowed: bridge)",
        ),
        (
            {"type": "direct", "source": "eno1", "mode": "bridge", "vlan": 7},
            "NIC 1: VLAN 7 is not published on host interface eno1 on lab (allowed: 100); ask staff",
        ),
        (
            {"type": "bridge", "source": "br0", "vlan": 10},
            "NIC 1: VLAN 10 is not published on host bridge br0 on lab (allowed: none)",
        ),
        (
            {"type": "bridge", "source": "br-trunk"},
            "NIC 1: host bridge br-trunk is published on lab only with a VLAN tag (10, 20); give one.",
        ),
        (
            {"type": "bridge", "source": "br-trunk", "vlan": 30},
            "VLAN 30 is not published on host bridge br-trunk on lab (allowed: 10, 20)",
        ),
    ]
    for nic, message in cases:
        refused(post_machine(user, lab, nics=[nic]), message)
    ok = [
        {"type": "direct", "source": "eno1", "mode": "bridge"},
        {"type": "direct", "source": "eno1", "mode": "bridge", "vlan": 100},
        {"type": "bridge", "source": "br-trunk", "vlan": 20},
        {"type": "bridge", "source": "br0"},
    ]
    r = post_machine(user, lab, nics=ok)
    assert r.status_code == 201, r.content
    nics = list(Machine.objects.get().nics.values_list("type", "source", "mode", "vlan"))
    assert nics == [
        ("direct", "eno1", "bridge", None),
        ("direct", "eno1", "bridge", 100),
        ("bridge", "br-trunk", "bridge", 20),
        ("bridge", "br0", "bridge", None),
    ]


def test_the_modes_and_tags_of_one_publication_are_not_mixed_with_another(lab):
    """Two rows on one interface: vepa with VLAN 10, bridge with VLAN 20. vepa with 20 is neither."""
    PublishedNetworkFactory(kind="direct", source="eno1", modes=["vepa"], vlans=[10], untagged=False)
    PublishedNetworkFactory(kind="direct", source="eno1", modes=["bridge"], vlans=[20], untagged=False)
    user = UserFactory(username="plain")
    refused(
        post_machine(user, lab, nics=[{"type": "direct", "source": "eno1", "mode": "vepa", "vlan": 20}]),
        "VLAN 20 is not published on host interface eno1 on lab (allowed: 10)",
    )
    assert (
        post_machine(user, lab, nics=[{"type": "direct", "source": "eno1", "mode": "bridge", "vlan": 20}]).status_code
        == 201
    )


def test_a_network_published_to_everyone_works_for_everyone(lab):
    PublishedNetworkFactory(kind="network", source="lan")
    for name in ("a", "b"):
        r = post_machine(UserFactory(username=name), lab, name=f"m-{name}", nics=[{"type": "network", "source": "lan"}])
        assert r.status_code == 201, r.content


def test_a_network_published_on_one_hypervisor_is_not_published_on_another(lab):
    edge = host("edge")
    PublishedNetworkFactory(kind="bridge", source="br0", hypervisor=edge)
    user = UserFactory(username="plain")
    refused(post_machine(user, lab, nics=[{"type": "bridge", "source": "br0"}]), f"host bridge br0 {NOT_PUBLISHED}")
    assert post_machine(user, edge, nics=[{"type": "bridge", "source": "br0"}]).status_code == 201


def test_a_network_published_to_a_project_is_for_the_machines_made_in_it(lab):
    team = ProjectFactory(name="team")
    chief, member, stranger = (
        UserFactory(username="chief"),
        UserFactory(username="member"),
        UserFactory(username="stranger"),
    )
    Membership.objects.create(project=team, user=chief, role="admin")
    Membership.objects.create(project=team, user=member, role="operator")
    PublishedNetworkFactory(kind="bridge", source="br0", everyone=False).projects.add(team)
    nic = [{"type": "bridge", "source": "br0"}]
    assert post_machine(chief, lab, project="team", nics=nic).status_code == 201
    # Outside the project the network is not theirs; the project's admin is told where it is.
    refused(
        post_machine(chief, lab, name="mine", nics=nic),
        "host bridge br0 is not published to you on lab (it is published to project team: create the machine in that project)",
    )
    refused(post_machine(member, lab, nics=nic), f"host bridge br0 {NOT_PUBLISHED}")  # members make no project machines
    refused(post_machine(stranger, lab, nics=nic), f"host bridge br0 {NOT_PUBLISHED}")
    assert Machine.objects.get().project == team


def test_staff_may_use_every_nic_kind(lab):
    nics = [
        {"type": "user"},
        {"type": "bridge", "source": "br0", "vlan": 10},
        {"type": "network", "source": "lan"},
        {"type": "direct", "source": "eno1", "mode": "passthrough", "vlan": 5},
    ]
    r = post_machine(UserFactory(username="boss", is_staff=True), lab, nics=nics)
    assert r.status_code == 201, r.content
    assert [n.type for n in Machine.objects.get().nics.all()] == ["user", "bridge", "network", "direct"]


def test_a_plain_user_is_refused_in_the_service_too(lab):
    """The service is the authority: any caller (API, form, admin, a script) gets the same refusal."""
    from machines import services

    with pytest.raises(ValidationError) as e:
        services.machine_create(
            owner=UserFactory(username="plain"),
            hypervisor=lab,
            name="m",
            deploy_type="network",
            nics=[services.NicInput(type="bridge", source="br0")],
        )
    assert e.value.message_dict["nics"] == [f"NIC 1: host bridge br0 {NOT_PUBLISHED}"]
    refusal = AuditEvent.objects.get(action="machine.create")  # the audit trail keeps the refusal and its rule
    assert refusal.outcome == "refused" and f"host bridge br0 {NOT_PUBLISHED}" in refusal.detail


# --- the tenant network, and the default NIC ----------------------------------------------------------------


def test_the_tenant_network_is_for_everyone_and_the_default_of_the_api(lab, iso):
    for user in (UserFactory(username="plain"), UserFactory(username="boss", is_staff=True)):
        r = post_machine(user, lab, name=f"t-{user.username}", nics=[{"type": "network", "source": TENANT}])
        assert r.status_code == 201, r.content
        r = post_machine(user, lab, name=f"d-{user.username}")  # no "nics": the default NIC
        assert r.status_code == 201, r.content
        assert [(n["type"], n["source"]) for n in r.json()["nics"]] == [("network", TENANT)]
        r = post_machine(user, lab, name=f"n-{user.username}", deploy_type="iso", image=iso.pk, nics=[])  # none asked
        assert r.status_code == 201 and r.json()["nics"] == [], r.content


def test_without_the_tenant_network_the_default_is_the_first_published_network_or_none(bare, iso):
    plain = UserFactory(username="plain")
    r = post_machine(plain, bare, deploy_type="network")
    refused(r, "A network-boot machine needs at least one NIC to boot from. No network is available to you on bare")
    assert (
        "define the tenant network on bare (Hypervisors → bare → Define a network → Tenant network)"
        in r.json()["nics"][0]
    )
    r = post_machine(plain, bare, name="inst", deploy_type="iso", image=iso.pk)  # image and ISO machines go without
    assert r.status_code == 201 and r.json()["nics"] == [], r.content
    PublishedNetworkFactory(kind="direct", source="eno1", modes=["vepa", "private"], vlans=[42], untagged=False)
    r = post_machine(plain, bare, name="m2")
    assert r.status_code == 201, r.content
    assert [(n["type"], n["source"], n["mode"], n["vlan"]) for n in r.json()["nics"]] == [
        ("direct", "eno1", "vepa", 42)
    ]
    r = post_machine(UserFactory(username="boss", is_staff=True), bare, name="m3", deploy_type="iso", image=iso.pk)
    assert r.json()["nics"] == []  # staff's API default without the tenant network: none, as before


# --- the create form ----------------------------------------------------------------------------------------


def values(form, name="nic"):
    out = []
    for value, label in form.fields[name].choices:
        out += [v for v, _ in label] if isinstance(label, list) else [value]
    return [str(v) for v in out]


def test_the_form_offers_a_plain_user_the_tenant_network_and_what_was_published(lab):
    PublishedNetworkFactory(kind="bridge", source="br-trunk", vlans=[10, 20])
    PublishedNetworkFactory(kind="direct", source="eno1", modes=["bridge", "private"])
    PublishedNetworkFactory(kind="bridge", source="br-gone")  # published, but lab has no such bridge
    PublishedNetworkFactory(kind="network", source="lan", everyone=False).projects.add(ProjectFactory(name="x"))
    form = MachineForm(initial={"hypervisor": lab.pk}, user=UserFactory(username="plain"))
    assert values(form) == ["", f"network:{TENANT}", "bridge:br-trunk", "direct:eno1"]
    assert values(form, "nic_mode") == ["bridge", "private"]  # never passthrough
    assert not form["nic_mode"].is_hidden and not form["nic_vlan"].is_hidden  # eno1 and br-trunk need them
    assert form["nic"].value() == f"network:{TENANT}" and not form.no_network
    labels = dict(c for _, group in form.fields["nic"].choices if isinstance(group, list) for c in group)
    assert (
        labels["bridge:br-trunk"] == "br-trunk (VLAN 10, 20)"
        and labels["direct:eno1"] == "eno1 (macvtap bridge/private)"
    )
    staff = MachineForm(initial={"hypervisor": lab.pk}, user=UserFactory(username="boss", is_staff=True))
    assert values(staff) == [
        "user:",
        "",
        "network:default",
        "network:lan",
        f"network:{TENANT}",
        "bridge:br-trunk",
        "bridge:br0",
        "direct:eno1",
    ]
    assert staff["nic"].value() == f"network:{TENANT}"  # the default for staff too, where there is one
    staff_labels = dict(c for _, group in staff.fields["nic"].choices if isinstance(group, list) for c in group)
    assert staff_labels["direct:eno1"] == "eno1" and staff_labels[f"network:{TENANT}"].endswith(
        "isolated from the hypervisor)"
    )
    assert values(staff, "nic_mode") == ["bridge", "vepa", "private", "passthrough"]


def test_a_plain_user_with_only_the_tenant_network_sees_no_macvtap_or_vlan_field(lab):
    client = Client()
    client.force_login(UserFactory(username="alone"))
    page = client.get(reverse("machines:create")).content.decode()
    assert f'value="network:{TENANT}"' in page
    # Nothing offered needs them; what is posted is still checked (test_the_form_refuses_a_plain_user_naming_the_rule).
    assert 'type="hidden" name="nic_vlan"' in page and 'type="hidden" name="nic_mode"' in page
    assert "VLAN tag" not in page and "macvtap mode" not in page


def test_the_form_default_follows_the_hypervisor(lab, bare):
    plain, boss = UserFactory(username="plain"), UserFactory(username="boss", is_staff=True)
    assert MachineForm(user=plain)["nic"].value() == f"network:{TENANT}"  # "any": lab has it
    assert MachineForm(initial={"hypervisor": bare.pk}, user=boss)["nic"].value() == "user:"
    form = MachineForm(initial={"hypervisor": bare.pk}, user=plain)
    assert form["nic"].value() == "" and values(form) == [""]
    assert form.no_network.startswith("No network is available to you on bare: there is no tenant network")
    PublishedNetworkFactory(kind="bridge", source="br0")
    assert MachineForm(initial={"hypervisor": bare.pk}, user=plain)["nic"].value() == "bridge:br0"


def test_the_page_says_when_no_network_is_available_and_network_boot_is_refused(bare, iso):
    client = Client()
    client.force_login(UserFactory(username="plain"))
    html = client.post(reverse("machines:form-fields"), {"hypervisor": bare.pk}).content.decode()
    assert 'id="no-network"' in html and "Staff fix this: define the tenant network on bare" in html
    data = {
        "deploy_type": "network",
        "name": "pxe1",
        "hypervisor": bare.pk,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 1,
        "pool": "default",
        "nic": "",
        "firmware": "bios",
        "disk_bus": "virtio",
    }
    r = client.post(reverse("machines:create"), data)
    errors = " ".join(r.context["form"].errors["nic"])
    assert r.status_code == 200 and "A network-boot machine needs a NIC to boot from. No network is available" in errors
    r = client.post(reverse("machines:create"), {**data, "deploy_type": "iso", "image": iso.pk, "name": "inst1"})
    assert r.status_code == 302 and not Machine.objects.get(name="inst1").nics.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nic": "user:"}, "NIC 1: user-mode networking is for staff only"),
        ({"nic": "bridge:br0"}, f"NIC 1: host bridge br0 {NOT_PUBLISHED}"),
        ({"nic": "bridge:br0", "nic_vlan": 10}, f"NIC 1: host bridge br0 {NOT_PUBLISHED}"),
        ({"nic": "network:lan"}, f"NIC 1: libvirt network lan {NOT_PUBLISHED}"),
        ({"nic": "direct:eno1", "nic_mode": "bridge"}, f"NIC 1: host interface eno1 {NOT_PUBLISHED}"),
        ({"nic": "direct:eno1", "nic_mode": "passthrough"}, "NIC 1: macvtap passthrough hands lab's interface eno1"),
    ],
)
def test_the_form_refuses_a_plain_user_naming_the_rule(lab, change, message):
    client = Client()
    client.force_login(UserFactory(username="plain"))
    data = {
        "deploy_type": "network",
        "name": "sneaky",
        "hypervisor": lab.pk,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 1,
        "pool": "default",
        "firmware": "bios",
        "disk_bus": "virtio",
        "nic_model": "virtio",
        **change,
    }
    r = client.post(reverse("machines:create"), data)
    assert r.status_code == 200 and not Machine.objects.exists()
    assert message in " ".join(r.context["form"].errors["nic"]), r.context["form"].errors


def test_the_form_creates_on_a_published_network_and_on_the_tenant_network(lab):
    PublishedNetworkFactory(kind="direct", source="eno1", modes=["private"], vlans=[7])
    client = Client()
    client.force_login(UserFactory(username="plain"))
    data = {
        "deploy_type": "network",
        "hypervisor": lab.pk,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 1,
        "pool": "default",
        "firmware": "bios",
        "disk_bus": "virtio",
        "nic_model": "virtio",
    }
    r = client.post(
        reverse("machines:create"), {**data, "name": "a", "nic": "direct:eno1", "nic_mode": "private", "nic_vlan": 7}
    )
    assert r.status_code == 302, r.context["form"].errors
    r = client.post(reverse("machines:create"), {**data, "name": "b", "nic": f"network:{TENANT}"})
    assert r.status_code == 302, r.context["form"].errors
    assert sorted(Machine.objects.values_list("name", "nics__type", "nics__source", "nics__mode", "nics__vlan")) == [
        ("a", "direct", "eno1", "private", 7),
        ("b", "network", TENANT, "bridge", None),
    ]


def test_the_form_redraws_for_the_project_with_its_networks(lab):
    team = ProjectFactory(name="team")
    chief = UserFactory(username="chief")
    Membership.objects.create(project=team, user=chief, role="admin")
    PublishedNetworkFactory(kind="bridge", source="br0", everyone=False).projects.add(team)
    client = Client()
    client.force_login(chief)
    assert MachineForm(user=chief).fields["project"].widget.attrs["hx-post"] == reverse("machines:form-fields")
    assert "bridge:br0" not in client.post(reverse("machines:form-fields"), {"hypervisor": lab.pk}).content.decode()
    html = client.post(reverse("machines:form-fields"), {"hypervisor": lab.pk, "project": team.pk}).content.decode()
    assert '<option value="bridge:br0">br0</option>' in html


# --- staff publish in the admin, recorded in the audit trail -----------------------------------------------


@pytest.fixture
def admin_client(db):
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def test_staff_publish_in_the_admin_and_it_is_audited(admin_client, lab):
    team = ProjectFactory(name="team")
    add = reverse("admin:hypervisors_publishednetwork_add")
    r = admin_client.post(
        add,
        {
            "hypervisor": lab.pk,
            "kind": "direct",
            "source": "eno1",
            "modes": ["bridge", "vepa"],
            "vlans": "101, 100",
            "untagged": "on",
            "projects": [team.pk],
            "note": "lab VLANs",
        },
    )
    assert r.status_code == 302, r.content.decode()[:2000]
    row = PublishedNetwork.objects.get()
    assert (row.modes, row.vlans, list(row.projects.all()), row.everyone) == (
        ["bridge", "vepa"],
        [100, 101],
        [team],
        False,
    )
    event = AuditEvent.objects.get(action="network.publish")
    assert event.user_id is not None and event.object_repr == "host interface (macvtap) eno1 on lab"
    assert "projects=[team]" in event.detail and "vlans=[101, 100]" in event.detail
    change = reverse("admin:hypervisors_publishednetwork_change", args=[row.pk])
    r = admin_client.post(
        change,
        {
            "hypervisor": lab.pk,
            "kind": "direct",
            "source": "eno1",
            "modes": ["bridge"],
            "vlans": "100 101",
            "untagged": "on",
            "everyone": "on",
            "note": "lab VLANs",
        },
    )
    assert (
        r.status_code == 302
        and AuditEvent.objects.filter(action="network.publish_update", detail__contains="modes").exists()
    )
    listing = admin_client.get(
        reverse("admin:hypervisors_publishednetwork_changelist"), {"q": "eno1", "kind__exact": "direct"}
    )
    assert listing.status_code == 200 and "eno1" in listing.content.decode()
    # A plain user's machine is on it: unpublishing says so (it keeps running, but will not be started).
    machine = MachineFactory(name="on-eno1", owner=UserFactory(username="plain-eno1"), hypervisor=lab)
    machine.nics.create(index=0, type="direct", source="eno1", mode="bridge", mac="52:54:00:00:e0:01")
    r = admin_client.post(
        reverse("admin:hypervisors_publishednetwork_delete", args=[row.pk]), {"post": "yes"}, follow=True
    )
    assert r.status_code == 200 and not PublishedNetwork.objects.exists()
    assert AuditEvent.objects.filter(action="network.unpublish", object_id=str(row.pk)).exists()
    assert (
        "Unpublished eno1: the network policy now refuses it to 1 machine(s) on it: on-eno1 on lab."
        in r.content.decode()
    )


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"modes": ["passthrough"]}, "modes", "Select a valid choice"),  # not even offered
        ({"modes": []}, "modes", "Allow at least one macvtap mode"),
        ({"kind": "bridge"}, "modes", "macvtap modes go with a host interface"),
        ({"vlans": "10 x"}, "vlans", "whole numbers"),
        ({"vlans": "5000"}, "vlans", "from 1 to 4094"),
        ({"kind": "network", "modes": [], "vlans": "10"}, "vlans", "a libvirt network sets its own"),
        ({"untagged": ""}, "untagged", "Allow untagged use or give VLAN tags"),
        ({"everyone": ""}, "everyone", "to everyone or to some projects"),
        ({"kind": "network", "modes": [], "source": TENANT}, "source", "already for everyone"),
    ],
)
def test_the_admin_refuses_what_cannot_be_published(admin_client, lab, change, field, message):
    data = {
        "hypervisor": lab.pk,
        "kind": "direct",
        "source": "eno1",
        "modes": ["bridge"],
        "vlans": "",
        "untagged": "on",
        "everyone": "on",
        **change,
    }
    data = {k: v for k, v in data.items() if v != ""}
    r = admin_client.post(reverse("admin:hypervisors_publishednetwork_add"), data)
    assert r.status_code == 200 and not PublishedNetwork.objects.exists()
    errors = r.context["adminform"].form.errors
    assert message in " ".join(errors.get(field, [])), errors


def test_the_model_never_takes_passthrough():
    row = PublishedNetwork(kind="direct", source="eno1", modes=["bridge", "passthrough"], everyone=True)
    with pytest.raises(ValidationError, match="passthrough hands the host's interface over"):
        row.full_clean()


def test_the_report_lists_machines_made_before_the_policy(lab):
    """Machines a plain user made with user-mode or host NICs before: staff find them, with the rule."""
    from django.core.management import CommandError, call_command

    plain = UserFactory(username="plain")
    old = MachineFactory(name="old", owner=plain, hypervisor=lab, deploy_type="network")
    old.nics.create(index=0, type="user", mac="52:54:00:00:00:11")
    old.nics.create(index=1, type="network", source=TENANT, mac="52:54:00:00:00:12")
    trunk = MachineFactory(name="trunk", owner=plain, hypervisor=lab, deploy_type="network")
    trunk.nics.create(index=0, type="direct", source="eno1", mode="passthrough", mac="52:54:00:00:00:13")
    mine = MachineFactory(name="staffs", owner=UserFactory(username="boss", is_staff=True), hypervisor=lab)
    mine.nics.create(index=0, type="user", mac="52:54:00:00:00:14")
    out = io.StringIO()
    with pytest.raises(CommandError, match=r"2 NIC\(s\) against the network policy"):
        call_command("nic_policy_report", stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith(
        f"lab/old (#{old.pk}, plain): NIC 1: user-mode networking is for staff"
    )
    assert lines[1].startswith(f"lab/trunk (#{trunk.pk}, plain): NIC 1: macvtap passthrough")
    old.delete()
    trunk.delete()
    out = io.StringIO()
    call_command("nic_policy_report", stdout=out)
    assert out.getvalue().strip() == "Every machine's NICs follow the network policy."


def test_a_published_network_the_portal_did_not_guard_is_refused(lab):
    PublishedNetworkFactory(kind="network", source="default")  # e.g. libvirt's own NAT network
    r = post_machine(UserFactory(username="plain"), lab, nics=[{"type": "network", "source": "default"}])
    refused(r, "NIC 1: network default on lab has no portal guard")


def test_staff_machines_in_a_project_follow_the_rules_of_its_members(lab):
    """Members operate a project's machines (consoles included): a staff-only NIC, QEMU argument or host
    device on one would hand them what staff keep to themselves."""
    staff = UserFactory(username="boss", is_staff=True)
    project = ProjectFactory(name="team")
    r = post_machine(staff, lab, project=project.name, nics=[{"type": "user"}])
    refused(r, "user-mode networking is for staff only")
    assert "The machine is in project team, whose members operate it" in " ".join(r.json()["nics"])
    r = post_machine(staff, lab, project=project.name, nics=[{"type": "bridge", "source": "br0"}])
    refused(r, "host bridge br0 is not published to you on lab")
    r = post_machine(staff, lab, project=project.name, qemu_args=["-netdev", "user,id=n9"])
    assert r.status_code == 400 and "project team is operated by its members" in str(r.json()), r.content
    PublishedNetworkFactory(kind="bridge", source="br0", everyone=False).projects.add(project)
    assert post_machine(staff, lab, project=project.name, nics=[{"type": "bridge", "source": "br0"}]).status_code == 201
    r = post_machine(staff, lab, name="own", nics=[{"type": "user"}])
    assert r.status_code == 201, r.content  # outside a project: staff's own


def test_the_policy_report_lists_project_machines_of_staff_too(lab):
    from machines.nic_policy import machines_against_policy

    staff = UserFactory(username="boss", is_staff=True)
    machine = MachineFactory(
        name="old", owner=staff, hypervisor=lab, deploy_type="network", project=ProjectFactory(name="team")
    )
    machine.nics.create(index=0, type="user", mac="52:54:00:00:00:99")
    assert [(m.name, "user-mode" in why) for m, why in machines_against_policy()] == [("old", True)]


def test_the_bridge_of_a_libvirt_network_is_refused_as_a_host_bridge_or_macvtap_parent(lab):
    """Review: staff published virbr-tenants (the tenant network's own bridge) as a host bridge, and a guest
    on it passed by the network's guard and pinged the hypervisor."""
    PublishedNetworkFactory(kind="bridge", source="virbr-tenants")
    r = post_machine(UserFactory(username="plain"), lab, nics=[{"type": "bridge", "source": "virbr-tenants"}])
    refused(r, f"virbr-tenants is the bridge of libvirt network {settings.PORTAL_TENANT_NETWORK} on lab")


def test_a_user_is_not_told_which_bridges_the_host_has_and_nics_are_bounded(lab):
    r = post_machine(UserFactory(username="plain"), lab, nics=[{"type": "bridge", "source": "br-mgmt"}])
    refused(r, "host bridge br-mgmt is not published to you on lab")
    assert "bridges:" not in str(r.json())
    r = post_machine(
        UserFactory(username="many"), lab, nics=[{"type": "network", "source": settings.PORTAL_TENANT_NETWORK}] * 9
    )
    refused(r, "At most 8 NICs.")


def test_a_machine_against_the_policy_is_neither_started_nor_rebuilt(lab):
    """Made before the policy (or its network unpublished since): the report lists it, and it does not start."""
    from machines import services

    owner = UserFactory(username="legacy")
    machine = MachineFactory(
        name="old", owner=owner, hypervisor=lab, deploy_type="network", status="active", power_state="off"
    )
    machine.nics.create(index=0, type="user", mac="52:54:00:00:00:98")
    with pytest.raises(services.MachineError, match="old cannot be started: NIC 1: user-mode networking is for staff"):
        services.machine_power(machine=machine, action="start", actor=machine.owner)
    with pytest.raises(services.MachineError, match="old cannot be rebuilt"):
        disk = ImageFactory(name="disk", kind="disk", format="qcow2", status=ImageStatus.READY)
        Machine.objects.filter(pk=machine.pk).update(deploy_type="image", image=disk)
        services.machine_rebuild(machine=Machine.objects.get(pk=machine.pk), actor=machine.owner)
    services.machine_power(
        machine=Machine.objects.get(pk=machine.pk), action="poweroff", actor=machine.owner
    )  # stopping is always fine

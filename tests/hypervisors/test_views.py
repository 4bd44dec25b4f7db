import pytest
from django.urls import reverse

from hypervisors.models import Hypervisor, HypervisorStatus
from tests.factories import HypervisorFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def hv(db):
    return HypervisorFactory(
        name="lab",
        arch="x86_64",
        cpus=8,
        memory_mib=16384,
        detected_domain_type="qemu",
        pools=[
            {
                "name": "default",
                "active": True,
                "type": "dir",
                "path": "/var/lib/libvirt/images",
                "capacity_bytes": 100 << 30,
                "allocation_bytes": 40 << 30,
                "available_bytes": 60 << 30,
            }
        ],
        unmanaged_domains=[{"uuid": "u-1", "name": "handmade", "state": "off"}],
    )


def test_pages_need_login(client, hv):
    for url in [reverse("hypervisors:list"), reverse("hypervisors:detail", args=[hv.pk]), reverse("home")]:
        r = client.get(url)
        assert r.status_code == 302 and r["Location"].startswith("/login/")


def test_list_shows_status_and_capacity(user_client, hv):
    r = user_client.get(reverse("hypervisors:list"))
    assert r.status_code == 200
    body = r.content.decode().replace("\xa0", " ")
    assert "lab" in body and "Online" in body and "60.0 GB free of 100.0 GB" in body
    assert "Add hypervisor" not in body  # not staff


def test_list_returns_the_table_partial_for_htmx(user_client, hv):
    r = user_client.get(reverse("hypervisors:list"), headers={"HX-Request": "true"})
    assert r.status_code == 200
    assert b"<html" not in r.content and b'id="hypervisor-table"' in r.content


def test_detail_polls_fast_while_checking(user_client, hv):
    Hypervisor.objects.filter(pk=hv.pk).update(status=HypervisorStatus.PENDING)
    r = user_client.get(reverse("hypervisors:detail", args=[hv.pk]), headers={"HX-Request": "true"})
    assert b'id="hypervisor-facts"' in r.content and b"every 2s" in r.content


def test_unmanaged_domains_are_for_staff_only(user_client, staff_client, hv):
    url = reverse("hypervisors:detail", args=[hv.pk])
    assert b"handmade" not in user_client.get(url).content
    assert b"handmade" in staff_client.get(url).content


def test_detail_of_a_missing_hypervisor_is_404(user_client):
    assert user_client.get(reverse("hypervisors:detail", args=[424242])).status_code == 404


def test_non_staff_cannot_add_edit_sync_or_delete(user_client, hv):
    for name, method in [("create", "get"), ("edit", "get"), ("sync", "post"), ("delete", "post")]:
        args = [] if name == "create" else [hv.pk]
        r = getattr(user_client, method)(reverse(f"hypervisors:{name}", args=args))
        assert r.status_code == 403, name
    assert Hypervisor.objects.filter(pk=hv.pk).exists()


def test_staff_adds_a_hypervisor(staff_client, test_hv_state, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        r = staff_client.post(
            reverse("hypervisors:create"),
            {
                "name": "lab2",
                "uri": "test:///default",
                "console_address": "127.0.0.1",
                "enabled": "on",
                "cpu_allocation_ratio": "4",
            },
        )
    hv = Hypervisor.objects.get(name="lab2")
    assert r.status_code == 302 and r["Location"] == hv.get_absolute_url()
    assert hv.status == HypervisorStatus.ONLINE


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "lab3", "uri": "qemu+ssh:///system"}, "needs a host"),
        ({"name": "lab3", "uri": "vmware://esx/"}, "Scheme &#x27;vmware&#x27; is not supported"),
        ({"name": "lab", "uri": "qemu:///system"}, "Hypervisor with this Name already exists"),
        ({"name": "Lab 3", "uri": "qemu:///system"}, "lower-case letters"),
        ({"name": "lab3", "uri": "qemu:///system", "console_address": "everywhere"}, "not an IP address"),
    ],
)
def test_bad_input_is_explained_and_nothing_is_saved(staff_client, hv, data, message):
    data = {"console_address": "127.0.0.1", "cpu_allocation_ratio": "4", **data}
    r = staff_client.post(reverse("hypervisors:create"), data)
    assert r.status_code == 200
    assert message in r.content.decode()
    assert Hypervisor.objects.count() == 1


def test_staff_edits_a_hypervisor(staff_client, hv, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        r = staff_client.post(
            reverse("hypervisors:edit", args=[hv.pk]),
            {
                "name": "lab",
                "uri": "qemu+tcp://127.0.0.1:1/system",
                "console_address": "127.0.0.1",
                "enabled": "on",
                "cpu_allocation_ratio": "4",
            },
        )
    assert r.status_code == 302
    hv.refresh_from_db()
    assert hv.uri == "qemu+tcp://127.0.0.1:1/system" and hv.status == HypervisorStatus.DOWN


def test_sync_refuses_get(staff_client, hv):
    assert staff_client.get(reverse("hypervisors:sync", args=[hv.pk])).status_code == 405


def test_sync_queues_a_check(staff_client, hv, django_capture_on_commit_callbacks, test_hv_state):
    Hypervisor.objects.filter(pk=hv.pk).update(status=HypervisorStatus.DOWN, last_checked=None)
    with django_capture_on_commit_callbacks(execute=True):
        r = staff_client.post(reverse("hypervisors:sync", args=[hv.pk]))
    assert r.status_code == 302
    hv.refresh_from_db()
    assert hv.status == HypervisorStatus.ONLINE and hv.last_checked is not None


def test_delete_asks_then_removes(staff_client, hv):
    r = staff_client.get(reverse("hypervisors:delete", args=[hv.pk]))
    assert b"Nothing on" in r.content and Hypervisor.objects.filter(pk=hv.pk).exists()
    r = staff_client.post(reverse("hypervisors:delete", args=[hv.pk]))
    assert r.status_code == 302 and not Hypervisor.objects.filter(pk=hv.pk).exists()


def test_home_summarises_hypervisors(user_client, hv):
    r = user_client.get(reverse("home"))
    assert r.status_code == 200 and b"lab" in r.content


def test_staff_see_whether_the_hypervisor_has_the_guarded_tenant_network(staff_client, hv):
    url = reverse("hypervisors:detail", args=[hv.pk])
    assert b'id="no-tenant-network"' in staff_client.get(url).content
    Hypervisor.objects.filter(pk=hv.pk).update(
        networks=[
            {
                "name": "portal-tenants",
                "active": True,
                "forward_mode": "isolated",
                "bridge": "virbr1",
                "guard": "portal-guard-portal-tenants",
            }
        ]
    )
    body = staff_client.get(url).content.decode()
    assert 'id="no-tenant-network"' not in body and ">guarded<" in body and ">tenant network<" in body


def test_staff_define_the_tenant_network_from_the_page(staff_client, hv, monkeypatch):
    queued = []
    monkeypatch.setattr("hypervisors.networks.network_create", lambda *, hypervisor, spec: queued.append(spec))
    r = staff_client.post(reverse("hypervisors:network-create", args=[hv.pk]), {"mode": "tenant"})
    assert r.status_code == 302
    assert [(s.name, s.mode, s.cidr, s.dhcp_start) for s in queued] == [
        ("portal-tenants", "tenant", "192.168.213.1/24", "192.168.213.10")
    ]

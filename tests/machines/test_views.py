from unittest import mock

import pytest
from django.urls import reverse

from hypervisors.models import ImageStatus
from machines.models import Machine, MachineObserved
from machines.states import Status
from tests.factories import HypervisorFactory, ImageFactory, MachineFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def machine(user):
    hv = HypervisorFactory(name="lab", uri="qemu:///system")
    return MachineFactory(name="web1", owner=user, hypervisor=hv, deploy_type="network", status=Status.ACTIVE)


@pytest.fixture
def other_client(client):
    client.force_login(UserFactory(username="mallory"))
    return client


MUTATING = ["power", "rebuild", "grow-disk", "protect", "delete"]


def test_anonymous_is_sent_to_login(client, machine):
    for url in [reverse("machines:list"), reverse("machines:detail", args=[machine.pk]), reverse("machines:create")]:
        r = client.get(url)
        assert r.status_code == 302 and r["Location"].startswith("/login/")


@pytest.mark.parametrize("name", MUTATING)
def test_another_users_machine_is_404(other_client, machine, name):
    r = other_client.post(reverse(f"machines:{name}", args=[machine.pk]), {"action": "poweroff"})
    assert r.status_code == 404
    machine.refresh_from_db()
    assert machine.operation == "" and machine.status == Status.ACTIVE


def test_another_users_machine_is_not_listed_or_shown(other_client, machine):
    assert b"web1" not in other_client.get(reverse("machines:list")).content
    assert other_client.get(reverse("machines:detail", args=[machine.pk])).status_code == 404


@pytest.mark.parametrize("name", ["power", "rebuild", "grow-disk", "protect"])
def test_get_is_405(user_client, machine, name):
    assert user_client.get(reverse(f"machines:{name}", args=[machine.pk])).status_code == 405


def test_power_post_queues_the_action(user_client, machine):
    r = user_client.post(reverse("machines:power", args=[machine.pk]), {"action": "poweroff"})
    assert r.status_code == 302
    assert Machine.objects.get(pk=machine.pk).operation == "poweroff"


def test_detail_state_partial_for_htmx(user_client, machine):
    r = user_client.get(reverse("machines:detail", args=[machine.pk]), headers={"HX-Request": "true"})
    assert r.status_code == 200 and b"<html" not in r.content and b'id="machine-state"' in r.content


def test_staff_see_every_machine(staff_client, machine):
    assert b"web1" in staff_client.get(reverse("machines:list")).content


def test_protection_toggle(user_client, machine):
    user_client.post(reverse("machines:protect", args=[machine.pk]), {"protected": "1"})
    assert Machine.objects.get(pk=machine.pk).deletion_protection is True
    r = user_client.post(reverse("machines:delete", args=[machine.pk]), follow=True)
    assert b"protected" in r.content and Machine.objects.filter(pk=machine.pk).exists()


def test_create_form_explains_itself(user_client):
    HypervisorFactory(name="lab")
    ImageFactory(name="debian-12", status=ImageStatus.READY, virtual_size_bytes=2 << 30)
    r = user_client.get(reverse("machines:create"))
    assert r.status_code == 200 and b"debian-12" in r.content and b"copy-on-write" in r.content


def test_preview_shows_the_documents(user_client):
    r = user_client.post(
        reverse("machines:preview"),
        {"name": "web9", "script": "echo <hi>", "nic": "user:"},
        headers={"HX-Request": "true"},
    )
    body = r.content.decode()
    assert "local-hostname: web9" in body and "echo &lt;hi&gt;" in body and "network-config" in body


def test_preview_reports_bad_user_data(user_client):
    r = user_client.post(reverse("machines:preview"), {"name": "web9", "user_data": "not cloud config"})
    assert "#cloud-config" in r.content.decode()


def test_search_filter_sort_and_paginate(user_client, user):
    hv = HypervisorFactory(name="lab2", uri="qemu:///system")
    for i in range(30):
        MachineFactory(
            name=f"web{i:02d}",
            owner=user,
            hypervisor=hv,
            deploy_type="network",
            status=Status.ERROR if i % 10 == 0 else Status.ACTIVE,
        )
    body = user_client.get(reverse("machines:list") + "?q=web1&sort=name").content.decode()
    assert "web10" in body and "web19" in body and "web20" not in body
    body = user_client.get(reverse("machines:list") + "?status=error").content.decode()
    assert all(f"web{i:02d}" in body for i in (0, 10, 20)) and "web01" not in body
    page2 = user_client.get(reverse("machines:list") + "?sort=name&page=2").content.decode()
    assert "web25" in page2 and "web00" not in page2 and "2 / 2" in page2


def test_bulk_actions_only_touch_your_machines(user_client, machine, other_client):
    other_machine = MachineFactory(
        name="theirs",
        owner=UserFactory(username="bob"),
        hypervisor=machine.hypervisor,
        deploy_type="network",
        status=Status.ACTIVE,
    )
    r = user_client.post(
        reverse("machines:bulk"), {"action": "poweroff", "ids": [machine.pk, other_machine.pk]}, follow=True
    )
    assert b"Power off: web1" in r.content
    assert Machine.objects.get(pk=machine.pk).operation == "poweroff"
    assert Machine.objects.get(pk=other_machine.pk).operation == ""


def test_bulk_delete_refuses_protected_machines(user_client, machine):
    Machine.objects.filter(pk=machine.pk).update(deletion_protection=True)
    r = user_client.post(reverse("machines:bulk"), {"action": "delete", "ids": [machine.pk]}, follow=True)
    assert b"protected" in r.content and Machine.objects.get(pk=machine.pk).status == Status.ACTIVE


def test_detail_and_list_show_the_addresses_the_guest_has(user_client, machine):
    nic = machine.nics.create(index=0, type="network", source="default", mac="52:54:00:12:34:56")
    Machine.objects.filter(pk=machine.pk).update(power_state="running")
    MachineObserved.objects.create(machine=machine, guest_addresses={nic.mac: ["192.0.2.10/24", "2001:db8::10/64"]})
    detail = user_client.get(
        reverse("machines:detail", args=[machine.pk]), headers={"HX-Request": "true"}
    ).content.decode()
    assert "now <strong>192.0.2.10/24, 2001:db8::10/64</strong>" in detail  # in the partial that refreshes
    listing = user_client.get(reverse("machines:list")).content.decode()
    assert "<code>192.0.2.10</code><br><code>2001:db8::10</code>" in listing
    api = user_client.get(f"/api/v1/machines/{machine.pk}/").json()
    assert api["guest_addresses"] == {nic.mac: ["192.0.2.10/24", "2001:db8::10/64"]}


def test_viewers_get_the_screen_but_not_the_serial_console(machine, client):
    """libvirt lends the serial port to one client: a watcher holding it would lock out the people who
    work on the machine, so viewers read the serial log instead."""
    from machines.models import Membership

    project = ProjectFactory(name="serial-watchers")
    Machine.objects.filter(pk=machine.pk).update(project=project)
    viewer = UserFactory(username="serial-watcher")
    Membership.objects.create(project=project, user=viewer, role="viewer")
    client.force_login(viewer)
    url = reverse("machines:console-token", args=[machine.pk])
    r = client.post(url, {"kind": "serial"})
    assert r.status_code == 403 and "its log is on the machine page" in r.json()["error"]
    assert client.post(url, {"kind": "spice"}).status_code == 400
    assert client.post(url).json()["view_only"] is True  # the screen, yes


def test_a_running_machine_without_a_screenshot_asks_for_one(user_client, machine):
    Machine.objects.filter(pk=machine.pk).update(power_state="running")
    with mock.patch("machines.services.machine_screenshot_request") as asked:
        html = user_client.get(reverse("machines:detail", args=[machine.pk])).content.decode()
    assert asked.called and 'id="no-screenshot"' in html and 'id="machine-screenshot"' not in html


def test_a_serial_token_dies_with_the_right_to_operate(machine):
    """Checked when the proxy spends it too: a role lowered between issue and connect is refused."""
    from machines import consoles
    from machines.models import Membership

    project = ProjectFactory(name="operators")
    Machine.objects.filter(pk=machine.pk).update(project=project)
    machine.refresh_from_db()
    member = UserFactory(username="ops-then-not")
    membership = Membership.objects.create(project=project, user=member, role="operator")
    raw, _ = consoles.console_token_issue(machine=machine, user=member, kind="serial")
    Membership.objects.filter(pk=membership.pk).update(role="viewer")
    with pytest.raises(consoles.ConsoleDenied, match="for those who operate the machine"):
        consoles.console_token_consume(raw=raw, machine_id=machine.pk, client="127.0.0.1", kind="serial")


def test_the_serial_log_is_shown_without_terminal_control_sequences(user_client, machine):
    raw = "\x1b[0;32mOK\x1b[0m booted\r\ntiny:~# \x1b[6n\x1b]0;title\x07echo hi\r\nhi\n"
    MachineObserved.objects.create(machine=machine, serial_log=raw)
    html = user_client.get(reverse("machines:detail", args=[machine.pk]) + "?fragment=serial").content.decode()
    assert "OK booted\ntiny:~# echo hi\nhi\n" in html and "\x1b" not in html
    assert MachineObserved.objects.get(machine=machine).serial_log == raw  # what is stored stays as the guest wrote it

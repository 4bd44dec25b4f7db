"""The staff import page: upload -> the plan (nothing changed) -> apply -> progress; no 500 on bad uploads."""

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from hypervisors.models import Hypervisor
from labs.models import InventoryImport
from machines.models import Machine
from tests.factories import UserFactory
from tests.labs.test_ansistack_apply import PHYS, VMS

FIXTURES = Path(__file__).parent / "fixtures"


def upload(name: str, text: str | bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, text.encode() if isinstance(text, str) else text, content_type="application/yaml")


@pytest.fixture
def owner(db):
    return UserFactory(username="mover", is_staff=True)


def post_files(client: Client, owner, *files, **extra):
    return client.post(reverse("imports:upload"), {"inventory_files": list(files), "owner": owner.pk, **extra})


def test_it_is_for_staff_only(user_client, client):
    assert user_client.get(reverse("imports:upload")).status_code == 403
    assert client.get(reverse("imports:upload")).status_code == 302  # to the login


def test_the_first_step_shows_the_plan_and_changes_nothing(staff_client, owner):
    r = post_files(
        staff_client,
        owner,
        upload("inventory-phys.yaml", (FIXTURES / "inventory-phys.yaml").read_text()),
        upload("inventory-vms.yaml", (FIXTURES / "inventory-vms.yaml").read_text()),
        vars_file=upload("main.yml", (FIXTURES / "vars-main.yml").read_text()),
    )
    imp = InventoryImport.objects.get()
    assert r.status_code == 302 and r.url == reverse("imports:detail", args=[imp.pk])
    page = staff_client.get(r.url).content.decode()
    assert "hypervisor kvm-a (qemu+ssh://labops@198.51.100.10/system): register" in page
    assert "error: inventory-vms.yaml:48: stray-0: vm_virt_host kvm-z" in page
    assert "Apply the plan (13 steps)" in page
    assert imp.status == "planned" and not Hypervisor.objects.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.yaml", (FIXTURES / "broken.yaml").read_text(), "broken.yaml:7: broken YAML"),
        ("list.yaml", "- a\n- b\n", "list.yaml:1: an inventory is a mapping of groups"),
        ("hosts.yaml", "all:\n  hosts:\n    - a\n", "hosts.yaml: not an Ansible inventory"),
        ("blank.yaml", "# nothing yet\n", "blank.yaml: the file is empty"),
    ],
)
def test_bad_inventories_are_report_lines_not_500s(staff_client, owner, name, content, message):
    r = post_files(staff_client, owner, upload(name, content))
    assert r.status_code == 302
    assert message in staff_client.get(r.url).content.decode()


def test_bad_uploads_are_form_errors(staff_client, owner):
    r = post_files(staff_client, owner, upload("empty.yaml", ""))
    assert r.status_code == 200 and "The submitted file is empty" in r.content.decode()
    r = post_files(staff_client, owner, upload("binary.yaml", b"\xff\xfe\x00bad"))
    assert r.status_code == 200 and "binary.yaml is not UTF-8 text" in r.content.decode()
    r = staff_client.post(reverse("imports:upload"), {"owner": owner.pk})
    assert r.status_code == 200 and "This field is required" in r.content.decode()
    r = post_files(staff_client, owner, upload("a.yaml", "all: {}\n"), lab_name="Not A Name!")
    assert r.status_code == 200 and "A lab name is lower-case" in r.content.decode()
    r = staff_client.post(reverse("imports:upload"), {"inventory_files": [upload("a.yaml", "x: 1\n")], "owner": "nope"})
    assert r.status_code == 200 and not InventoryImport.objects.exists()
    assert staff_client.get(reverse("imports:detail", args=[999])).status_code == 404
    assert staff_client.get(reverse("imports:apply", args=[1])).status_code == 405


def test_apply_then_progress(staff_client, owner, host, monkeypatch, django_capture_on_commit_callbacks):
    monkeypatch.setattr("hypervisors.services.get_driver", host.get_driver)
    monkeypatch.setattr("hypervisors.networks.get_driver", host.get_driver)
    r = post_files(staff_client, owner, upload("phys.yaml", PHYS), upload("vms.yaml", VMS))
    imp = InventoryImport.objects.get()
    with django_capture_on_commit_callbacks(execute=True):
        applied = staff_client.post(reverse("imports:apply", args=[imp.pk]))
    assert applied.status_code == 302 and applied.url == r.url
    imp.refresh_from_db()
    assert imp.status == "done" and Machine.objects.get().name == "node-0"
    fragment = staff_client.get(r.url, headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in fragment and 'id="import-progress"' in fragment
    assert "Done: 3 of 3 steps" in fragment and "machine node-0: created on kvm-a (network), in lab vms" in fragment
    assert "hx-trigger" not in fragment  # finished: the poll stops
    again = staff_client.post(reverse("imports:apply", args=[imp.pk]))
    assert again.status_code == 302  # applied already: its page, not a second run


def test_the_progress_polls_while_applying(staff_client, owner):
    imp = InventoryImport.objects.create(created_by=owner, owner=owner, status="applying", total_steps=4, done_steps=1)
    fragment = staff_client.get(reverse("imports:detail", args=[imp.pk]), headers={"HX-Request": "true"}).content
    assert b'hx-trigger="every 2s"' in fragment and b"Applying: 1 of 4 steps" in fragment

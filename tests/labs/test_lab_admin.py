"""The admin of labs, lab templates and inventory imports: lists and pages answer, a template's YAML is checked
as the service checks it, a lab with machines is not deleted from here, an import's records are read-only."""

import pytest
from django.urls import reverse

from labs.models import InventoryImport, Lab, LabMachine, LabTemplate
from tests.factories import MachineFactory
from tests.labs.test_lab_services import spec

pytestmark = pytest.mark.django_db


def test_the_admin_lists_and_shows_labs_templates_and_imports(staff, staff_client):
    lab = Lab.objects.create(name="adm", owner=staff)
    LabMachine.objects.create(lab=lab, machine=MachineFactory(name="adm-0", owner=staff), group="g")
    template = LabTemplate.objects.create(name="t", owner=staff, spec=spec())
    job = InventoryImport.objects.create(created_by=staff, owner=staff, plan={"machines": []}, report=["done"])
    for model, obj in (("lab", lab), ("labtemplate", template), ("inventoryimport", job)):
        assert staff_client.get(reverse(f"admin:labs_{model}_changelist")).status_code == 200
        page = staff_client.get(reverse(f"admin:labs_{model}_change", args=[obj.pk]))
        assert page.status_code == 200
    assert b"adm-0" in staff_client.get(reverse("admin:labs_lab_change", args=[lab.pk])).content
    # A lab with machines is deleted from its page or the API (machines first), not from the admin.
    assert staff_client.get(reverse("admin:labs_lab_delete", args=[lab.pk])).status_code == 403
    # An import is a record: no add, no change.
    assert staff_client.get(reverse("admin:labs_inventoryimport_add")).status_code == 403
    page = staff_client.post(reverse("admin:labs_inventoryimport_change", args=[job.pk]), {"lab_name": "x"})
    assert page.status_code == 403 and InventoryImport.objects.get().lab_name == ""


def test_a_template_saved_in_the_admin_is_checked(staff, staff_client):
    data = {"name": "bad", "owner": str(staff.pk), "spec": "g:\n  vars: {vm_count: 2}"}
    r = staff_client.post(reverse("admin:labs_labtemplate_add"), data)
    assert r.status_code == 200 and b"give vm_image_name" in r.content and not LabTemplate.objects.exists()
    r = staff_client.post(reverse("admin:labs_labtemplate_add"), {**data, "spec": spec()})
    assert r.status_code == 302 and LabTemplate.objects.get().name == "bad"

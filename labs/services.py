"""What changes labs. Views, the API, the admin, the import and tasks call these."""

from __future__ import annotations

from django.db import transaction

from labs.models import Lab, LabMachine
from machines.models import Machine, Project


@transaction.atomic
def lab_get_or_create(*, name: str, owner, project: Project | None = None, source: str = "") -> Lab:
    """The lab of that name in the project (or, without one, of that owner), made if it is not there yet."""
    lookup = {"project": project} if project is not None else {"project": None, "owner": owner}
    lab, _ = Lab.objects.get_or_create(name=name, **lookup, defaults={"owner": owner, "source": source})
    return lab


def lab_add_machine(*, lab: Lab, machine: Machine, group: str = "") -> LabMachine:
    """Put a machine in a lab (a machine is in one lab at most: this moves it there)."""
    member, _ = LabMachine.objects.update_or_create(machine=machine, defaults={"lab": lab, "group": group})
    return member

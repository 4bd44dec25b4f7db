"""The lab pages' forms: a template (its YAML), and a template's instantiation (name, counts, name patterns and
address offsets per group). The services decide; these only shape the input."""

from __future__ import annotations

from django import forms

from labs import services, specs
from labs.models import LabTemplate, ScheduledAction
from machines.access import project_choices
from machines.models import Project, hostname_validator

EXAMPLE_SPEC = """\
all_vms:
  children:
    bootable_vms:
      vars:
        vm_networks:
          provisioning: {interface: eth0, dhcp: false, address: 192.168.24.10, netmask: 24}
      children:
        controllers:
          vars: {vm_count: 3, vm_cores: 2, vm_ram: 4096, vm_disk_size: 40}
        computes:
          vars: {vm_count: 2, vm_cores: 2, vm_ram: 4096, vm_disk_size: 40, vm_address_offsets: {provisioning: 10}}
"""


class LabTemplateForm(forms.Form):
    name = forms.CharField(max_length=100)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    project = forms.ModelChoiceField(
        queryset=Project.objects.none(),
        required=False,
        empty_label="For everyone (staff)",
        help_text="A project's admins make templates for their project; staff make them for everyone too.",
    )
    spec = forms.CharField(
        label="Groups (YAML)",
        max_length=specs.MAX_SPEC_BYTES,
        widget=forms.Textarea(attrs={"rows": 18, "class": "form-control font-monospace", "spellcheck": "false"}),
        help_text="AnsiStack's inventory shape: groups with vars and children; each group without children is "
        "vm_count machines (under bootable_vms: network boot; with vm_image_name: image machines; with "
        "vm_bootable_iso: ISO machines).",
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["project"].queryset = services.template_projects(user)  # type: ignore[attr-defined]
        if not user.is_staff:
            self.fields["project"].required = True
            self.fields["project"].empty_label = None  # type: ignore[attr-defined]

    @classmethod
    def for_template(cls, template: LabTemplate, *, user, data=None) -> LabTemplateForm:
        initial = {
            "name": template.name,
            "description": template.description,
            "project": template.project_id,
            "spec": template.spec,
        }
        return cls(data, initial=initial, user=user)


def _group_field(group: str, kind: str, net: str = "") -> str:
    return f"{kind}__{group}" + (f"__{net}" if net else "")


class InstantiateForm(forms.Form):
    """The lab's name and where it goes, then per group: how many, named how, addresses from which offset."""

    name = forms.CharField(max_length=63, help_text="The lab's name (a host name: it may be part of its machines').")
    project = forms.ModelChoiceField(queryset=Project.objects.none(), required=False, empty_label="No project (mine)")
    placement = forms.ChoiceField(choices=list(services.PLACEMENTS.items()), initial=services.SPREAD)
    first = forms.IntegerField(
        label="First number", min_value=0, max_value=9999, initial=0, help_text="n of each group's first machine."
    )
    saved_keys = forms.BooleanField(label="Put my saved SSH keys on image machines", required=False, initial=True)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args, template: LabTemplate, spec: specs.Spec, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec
        projects = project_choices(user)
        if template.project_id is not None:
            projects = projects.filter(pk=template.project_id)
            self.fields["project"].required = True
            self.fields["project"].initial = template.project_id
        self.fields["project"].queryset = projects  # type: ignore[attr-defined]
        for g in spec.groups:
            self.fields[_group_field(g.name, "count")] = forms.IntegerField(
                label=f"{g.name}: machines", min_value=0, max_value=specs.MAX_COUNT, initial=g.count
            )
            self.fields[_group_field(g.name, "pattern")] = forms.CharField(
                label=f"{g.name}: name pattern",
                max_length=100,
                initial=g.pattern,
                help_text="{lab}, {group}, {n} (or {n:02d}).",
            )
            for net in g.nets:
                if net.base is not None:
                    self.fields[_group_field(g.name, "offset", net.network)] = forms.IntegerField(
                        label=f"{g.name}: {net.network} offset",
                        min_value=0,
                        max_value=1 << 16,
                        initial=g.offsets.get(net.network, 0),
                        help_text=f"Address = {net.base.ip} + offset + n.",
                    )

    def group_rows(self):
        """The per-group fields, group by group, for the template to lay out."""
        for g in self.spec.groups:
            names = [_group_field(g.name, "count"), _group_field(g.name, "pattern")]
            names += [_group_field(g.name, "offset", n.network) for n in g.nets if n.base is not None]
            yield g, [self[n] for n in names]

    def service_kwargs(self) -> dict:
        data = self.cleaned_data
        counts, patterns, offsets = {}, {}, {}
        for g in self.spec.groups:
            counts[g.name] = data[_group_field(g.name, "count")]
            patterns[g.name] = data[_group_field(g.name, "pattern")]
            offsets[g.name] = {
                n.network: data[_group_field(g.name, "offset", n.network)] for n in g.nets if n.base is not None
            }
        return {
            "name": data["name"],
            "project": data.get("project"),
            "placement": data["placement"],
            "first": data["first"],
            "description": data.get("description", ""),
            "saved_keys": data.get("saved_keys", False),
            "counts": counts,
            "patterns": patterns,
            "offsets": offsets,
        }


class ScheduleForm(forms.Form):
    """A scheduled action (labs/schedules.py): the service checks the values again and says why."""

    action = forms.ChoiceField(
        choices=ScheduledAction.Action.choices, widget=forms.Select(attrs={"class": "form-select form-select-sm"})
    )
    hour = forms.IntegerField(min_value=0, max_value=23, initial=8)
    minute = forms.IntegerField(min_value=0, max_value=59, initial=0)
    weekdays = forms.TypedMultipleChoiceField(
        choices=[(i, d) for i, d in enumerate(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])],
        coerce=int,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None: every day.",
    )
    retention = forms.IntegerField(
        min_value=1, max_value=10, initial=3, required=False, help_text="Snapshots: how many to keep (3 if empty)."
    )

    def clean_retention(self) -> int:
        return self.cleaned_data.get("retention") or 3


class LabEditForm(forms.Form):
    """A lab's name and description (labs.services.lab_change checks the name is free)."""

    name = forms.CharField(max_length=63, validators=[hostname_validator])
    description = forms.CharField(required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 3}))

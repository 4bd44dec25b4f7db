"""The workflow pages' forms: a workflow's registration (its variables' schema typed as YAML or JSON), and a run
(its targets, and a field per variable the workflow takes). The services decide; these only shape the input."""

from __future__ import annotations

from typing import Any

import yaml
from django import forms
from django.core.exceptions import ValidationError

from labs.models import Lab
from labs.services import labs_for
from machines.access import machines_for
from machines.models import Machine, Project
from workflows import access
from workflows.models import Workflow

MAX_SCHEMA_BYTES = 64 * 1024
VAR_PREFIX = "var_"  # a variable's field name: its own name could be "machines" or "lab"

EXAMPLE_VARIABLES = """\
# A list of variables, in YAML (or JSON):
# - name: greeting            # what the playbook reads
#   type: string              # string, integer, boolean or choice
#   default: hello
#   required: false
#   secret: false             # true: never shown, never logged
#   choices: []               # for type choice
#   help: What to write
[]
"""


def _textarea(rows: int) -> forms.Textarea:
    return forms.Textarea(attrs={"rows": rows, "class": "form-control font-monospace", "spellcheck": "false"})


def parse_schema_text(text: str) -> Any:
    """The variables' schema typed on the form: YAML (JSON is YAML too), read with the safe loader."""
    try:
        return yaml.safe_load(text or "[]")
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # a malformed or absurd text: a message
        raise ValidationError(f"Not valid YAML or JSON: {e}") from None


class WorkflowForm(forms.Form):
    name = forms.CharField(max_length=100)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    project = forms.ModelChoiceField(
        queryset=Project.objects.none(),
        required=False,
        empty_label="For everyone (staff)",
        help_text="A project's admins register workflows for their project; staff for everyone too.",
    )
    source = forms.ChoiceField(choices=Workflow.Source.choices, initial=Workflow.Source.DIRECTORY)
    directory = forms.CharField(max_length=500, required=False, help_text="For a directory: its absolute path.")
    git_url = forms.CharField(label="Git URL", max_length=500, required=False)
    git_ref = forms.CharField(label="Git ref", max_length=200, required=False, help_text="A branch, tag or commit.")
    playbook = forms.CharField(max_length=200, initial="playbook.yml", help_text="Relative to the checkout.")
    variables = forms.CharField(
        label="Variables (YAML or JSON)",
        required=False,
        max_length=MAX_SCHEMA_BYTES,
        widget=_textarea(12),
        help_text="A list: name, type (string, integer, boolean, choice), default, required, secret, choices, help.",
    )
    groups = forms.CharField(
        required=False,
        max_length=2000,
        help_text="Inventory groups the playbook targets, separated by spaces or commas.",
    )
    enabled = forms.BooleanField(required=False, initial=True, help_text="Offered in the catalogue.")

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["project"].queryset = access.writable_projects(user)  # type: ignore[attr-defined]
        if not user.is_staff:
            self.fields["project"].required = True
            self.fields["project"].empty_label = None  # type: ignore[attr-defined]

    @classmethod
    def for_workflow(cls, workflow: Workflow, *, user, data=None) -> WorkflowForm:
        variables = (
            yaml.safe_dump(workflow.variables, sort_keys=False, allow_unicode=True) if workflow.variables else "[]\n"
        )
        initial = {
            "name": workflow.name,
            "description": workflow.description,
            "project": workflow.project_id,
            "source": workflow.source,
            "directory": workflow.directory,
            "git_url": workflow.git_url,
            "git_ref": workflow.git_ref,
            "playbook": workflow.playbook,
            "variables": variables,
            "groups": " ".join(str(g) for g in workflow.groups),
            "enabled": workflow.enabled,
        }
        return cls(data, initial=initial, user=user)

    def clean_variables(self) -> Any:
        from workflows.variables import validate_schema

        # Checked and normalised (every key present); a ValidationError is shown on the field.
        return validate_schema(parse_schema_text(self.cleaned_data.get("variables", "")))

    def clean_groups(self) -> list[str]:
        text = self.cleaned_data.get("groups", "")
        return [g for g in text.replace(",", " ").split() if g]

    def service_kwargs(self) -> dict[str, Any]:
        data = self.cleaned_data
        keys = ("name", "description", "project", "source", "directory", "git_url", "git_ref", "playbook")
        return {**{k: data.get(k) for k in keys}, "variables": data["variables"], "groups": data["groups"]}


def _variable_field(spec: dict) -> forms.Field:
    """The form field of one variable of a workflow's schema."""
    kind = spec.get("type", "string")
    label = spec.get("name", "")
    help_text = str(spec.get("help") or "")
    default = spec.get("default")
    required = bool(spec.get("required")) and default in (None, "")
    common: dict[str, Any] = {"label": label, "help_text": help_text, "required": required}
    if spec.get("secret"):
        # Never re-rendered with its value, not even after a failed submit.
        widget = forms.PasswordInput(attrs={"class": "form-control", "autocomplete": "new-password"})
        return forms.CharField(widget=widget, strip=False, max_length=10_000, **common)
    if kind == "integer":
        return forms.IntegerField(
            initial=default, min_value=-(2**63), max_value=2**63 - 1, widget=forms.NumberInput(), **common
        )
    if kind == "boolean":
        return forms.BooleanField(initial=bool(default), **{**common, "required": False})
    if kind == "choice":
        choices = [(str(c), str(c)) for c in spec.get("choices") or ()]
        if not required:
            choices = [("", "(default)" if default not in (None, "") else "–"), *choices]
        return forms.ChoiceField(choices=choices, initial=default, **common)
    return forms.CharField(initial=default, max_length=10_000, strip=False, **common)


class RunForm(forms.Form):
    """A run's targets (machines and/or a lab the user sees) and a field per variable of the workflow."""

    machines: forms.ModelMultipleChoiceField = forms.ModelMultipleChoiceField(
        queryset=Machine.objects.none(),
        required=False,
        widget=forms.SelectMultiple(attrs={"class": "form-select", "size": 6}),
        help_text="Machines you may operate.",
    )
    lab: forms.ModelChoiceField = forms.ModelChoiceField(
        queryset=Lab.objects.none(),
        required=False,
        empty_label="No lab",
        widget=forms.Select(attrs={"class": "form-select"}),
        help_text="Every machine of the lab you may see.",
    )

    def __init__(self, *args, workflow: Workflow, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.workflow = workflow
        self.fields["machines"].queryset = machines_for(user).order_by("name")  # type: ignore[attr-defined]
        self.fields["lab"].queryset = labs_for(user).order_by("name")  # type: ignore[attr-defined]
        self.variable_names: list[str] = []
        for spec in workflow.variables if isinstance(workflow.variables, list) else ():
            if not isinstance(spec, dict) or not spec.get("name"):
                continue
            self.fields[VAR_PREFIX + str(spec["name"])] = _variable_field(spec)
            self.variable_names.append(str(spec["name"]))

    def variable_fields(self) -> list[forms.BoundField]:
        return [self[VAR_PREFIX + n] for n in self.variable_names]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not self.errors and not data.get("machines") and not data.get("lab"):
            raise ValidationError("Pick machines or a lab to run against.")
        return data

    def variables(self) -> dict[str, Any]:
        """The values typed, without those left empty (the workflow's defaults apply to them)."""
        values = {}
        for name in self.variable_names:
            value = self.cleaned_data.get(VAR_PREFIX + name)
            if value is None or value == "":
                continue
            values[name] = value
        return values

    def aliases(self) -> dict[str, str]:
        """A service's ValidationError names variables; the form names their fields."""
        return {n: VAR_PREFIX + n for n in self.variable_names}

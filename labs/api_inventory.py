"""`GET /api/v1/inventory/`: the Ansible inventory (labs.inventory) of the machines the token's user may see, in
Ansible's JSON inventory format, for scripts/portal-inventory and anything else that speaks it."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from labs import inventory, services
from labs.models import Lab
from machines.models import Project

MAX_ID = 2**63 - 1  # past it, a lookup by id would overflow the database's integer


def _by_id_or_name(qs, value: str, what: str):
    """The one row of `qs` with that id (digits) or name; a ValidationError naming `what` otherwise."""
    value = value.strip()
    if value.isascii() and value.isdigit() and int(value) <= MAX_ID:
        row = qs.filter(pk=int(value)).first()
    else:
        rows = list(qs.filter(name=value)[:2])
        if len(rows) > 1:
            raise serializers.ValidationError(f"More than one {what} is named {value!r}: give its id.")
        row = rows[0] if rows else None
    if row is None:
        raise serializers.ValidationError(f"No {what} {value!r} that you may see.")
    return row


class InventoryQuerySerializer(serializers.Serializer):
    lab = serializers.CharField(
        required=False, max_length=100, help_text="Only this lab's machines: its id or its name."
    )
    project = serializers.CharField(
        required=False, max_length=100, help_text="Only this project's machines: its id or its name."
    )
    bmc = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Also console links and the BMC credentials you may reveal (each reveal is recorded).",
    )

    def validate_lab(self, value: str) -> Lab:
        return _by_id_or_name(services.labs_for(self.context["user"]), value, "lab")

    def validate_project(self, value: str) -> Project:
        return _by_id_or_name(inventory.projects_for(self.context["user"]), value, "project")


_GROUP = {
    "type": "object",
    "properties": {"hosts": {"type": "array", "items": {"type": "string"}}},
    "required": ["hosts"],
}
INVENTORY_SCHEMA = {
    "type": "object",
    "description": "Ansible's JSON inventory: `_meta.hostvars` (host -> variables), `all.children` (the group "
    "names), and one entry per group with its `hosts`.",
    "properties": {
        "_meta": {
            "type": "object",
            "properties": {
                "hostvars": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": True}}
            },
            "required": ["hostvars"],
        },
        "all": {
            "type": "object",
            "properties": {"children": {"type": "array", "items": {"type": "string"}}},
            "required": ["children"],
        },
    },
    "required": ["_meta", "all"],
    "additionalProperties": _GROUP,
}


class InventoryView(APIView):
    """The Ansible inventory of your machines (or of one lab or project), grouped by project, lab, deploy type,
    hypervisor, tag and lab member group, with each machine's address, login user and portal facts."""

    @extend_schema(
        operation_id="inventory_retrieve",
        parameters=[InventoryQuerySerializer],
        responses={200: OpenApiResponse(response=INVENTORY_SCHEMA, description="Ansible's JSON inventory.")},
    )
    def get(self, request):
        query = InventoryQuerySerializer(data=request.query_params, context={"user": request.user})
        query.is_valid(raise_exception=True)
        data = query.validated_data
        body = inventory.build_inventory(
            request.user,
            lab=data.get("lab"),
            project=data.get("project"),
            bmc=data["bmc"],
            request=request,
        )
        response = Response(body)
        if data["bmc"]:
            response["Cache-Control"] = "no-store"  # BMC passwords
        return response

"""The Ansible inventory as a YAML download in the shape of AnsiStack's `vm-lab-inventory.yaml`: all of the user's
machines (`/labs/inventory.yaml`, or `?lab=<id or name>`) or one lab's (`/labs/<id>/inventory.yaml`). `?bmc=1` adds console links and
the BMC credentials the user may reveal (recorded); `?project=<id or name>` keeps one project's machines."""

from __future__ import annotations

import yaml
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET

from labs import inventory, services
from labs.api_inventory import InventoryQuerySerializer

CONTENT_TYPE = "application/yaml; charset=utf-8"


def _download(request: HttpRequest, *, lab=None, filename: str) -> HttpResponse:
    query = InventoryQuerySerializer(data=request.GET, context={"user": request.user})
    if not query.is_valid():
        lines = [f"{field}: {' '.join(str(m) for m in messages)}" for field, messages in query.errors.items()]
        return HttpResponseBadRequest("\n".join(lines) + "\n", content_type="text/plain; charset=utf-8")
    data = query.validated_data
    body = inventory.build_inventory(
        request.user,
        lab=lab if lab is not None else data.get("lab"),
        project=data.get("project"),
        bmc=data["bmc"],
        request=request,
    )
    text = yaml.safe_dump(inventory.ansistack_inventory(body), default_flow_style=False, sort_keys=False)
    response = HttpResponse("---\n" + text, content_type=CONTENT_TYPE)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    if data["bmc"]:
        response["Cache-Control"] = "no-store"  # BMC passwords
    return response


@login_required
@require_GET
def inventory_yaml(request: HttpRequest) -> HttpResponse:
    return _download(request, filename="vm-lab-inventory.yaml")


@login_required
@require_GET
def lab_inventory_yaml(request: HttpRequest, pk: int) -> HttpResponse:
    lab = get_object_or_404(services.labs_for(request.user), pk=pk)
    return _download(request, lab=lab, filename=f"vm-lab-{lab.name}-inventory.yaml")

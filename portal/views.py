from datetime import date

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from hypervisors.models import Hypervisor, HypervisorStatus
from portal.decorators import staff_required
from portal.models import AuditEvent


@login_required
@require_GET
def home(request) -> HttpResponse:
    hypervisors = list(Hypervisor.objects.all())
    counts = {s: sum(1 for h in hypervisors if h.status == s) for s in HypervisorStatus.values}
    return render(request, "home.html", {"hypervisors": hypervisors, "counts": counts})


@require_GET
def healthz(request) -> JsonResponse:
    """Liveness for a load balancer: the web process answers and reaches its database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


@staff_required
@require_GET
def audit_list(request) -> HttpResponse:
    """Staff: the audit trail, filtered by user, action, object type, outcome and date."""
    events = AuditEvent.objects.all()
    filters = {k: request.GET.get(k, "").strip() for k in ("user", "action", "object_type", "outcome", "since")}
    if filters["user"]:
        events = events.filter(username__icontains=filters["user"])
    if filters["action"]:
        events = events.filter(action__startswith=filters["action"])
    if filters["object_type"]:
        events = events.filter(object_type=filters["object_type"])
    if filters["outcome"]:
        events = events.filter(outcome=filters["outcome"])
    if filters["since"]:
        try:
            events = events.filter(created__date__gte=date.fromisoformat(filters["since"]))
        except ValueError:
            messages.error(request, "Give the date as YYYY-MM-DD.")
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    return render(request, "portal/audit.html", {
        "page": page, "filters": filters, "outcomes": AuditEvent.Outcome.choices,
        "actions": AuditEvent.objects.order_by("action").values_list("action", flat=True).distinct(),
        "object_types": AuditEvent.objects.exclude(object_type="").order_by("object_type").values_list("object_type", flat=True).distinct(),
    })  # fmt: skip

from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Count
from django.http import HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from hypervisors.models import Hypervisor, HypervisorStatus
from machines.access import HYPERVISOR_CAPABILITIES, for_lists, machines_for
from machines.capacity import usage_by, usage_report
from machines.models import Machine, MachineEvent
from machines.services import expiring_soon
from machines.states import BUSY, Status
from metrics.series import sparklines
from portal import audit, audit_export
from portal.decorators import staff_required
from portal.models import AuditEvent
from portal.queue import queue_report


@login_required
@require_GET
def home(request) -> HttpResponse:
    hypervisors = list(Hypervisor.objects.defer(*HYPERVISOR_CAPABILITIES))  # the cards show no capability
    placed = usage_by(Machine.objects.all(), "hypervisor")  # what placement counts as taken (capacity.held)
    for h in hypervisors:
        taken = placed.get(h.pk, {})
        # Two attributes for the template only, like an annotate() would add; the model does not declare them.
        h.placed_memory, h.placed_vcpus = taken.get("memory_mib", 0), taken.get("vcpus", 0)  # type: ignore[attr-defined]
    if request.user.is_staff:  # the capacity bars are staff's: each gets its last 24 hours (one query for all)
        lines = sparklines([h.pk for h in hypervisors])
        for h in hypervisors:
            h.spark = lines.get(h.pk)  # type: ignore[attr-defined]
    counts = {s: sum(1 for h in hypervisors if h.status == s) for s in HypervisorStatus.values}
    mine = machines_for(request.user).filter(owner=request.user)
    by_status = {row["status"]: row["n"] for row in mine.values("status").annotate(n=Count("pk"))}
    events = MachineEvent.objects.filter(machine__in=machines_for(request.user)).select_related("machine")
    events = events.only("created", "step", "message", "level", "machine__name")  # a link to each machine
    return render(
        request,
        "home.html",
        {
            "hypervisors": hypervisors,
            "counts": counts,
            "usage": usage_report(request.user),
            "by_status": [(Status(k).label, v) for k, v in sorted(by_status.items())],
            "machine_count": mine.count(),
            "events": events.order_by("-created", "-pk")[:12],
            "queue": queue_report(limit=10 if request.user.is_staff else 0),
            "busy": for_lists(machines_for(request.user)).filter(status__in=BUSY).order_by("status_changed")[:10],
            "expiring": expiring_soon(request.user)[:10],
        },
    )


@csrf_exempt  # it changes nothing; a POST there gets the 404, not the CSRF failure page
def api_not_found(request, *args, **kwargs) -> JsonResponse:
    """A path under /api/ that no route matches (a malformed id, say): the JSON 404 every API client reads,
    not the HTML page."""
    return JsonResponse({"detail": "Not found."}, status=404)


def bad_request(request, exception=None) -> HttpResponse:
    """Django's 400 for a request it refuses before any view (too many fields, a malformed multipart body, a
    bad Host): under /api/ the JSON every API client reads, with the reason; elsewhere Django's own page."""
    if request.path.startswith("/api/"):
        reason = str(exception) if exception else ""
        return JsonResponse({"detail": f"Bad request: {reason}" if reason else "Bad request."}, status=400)
    from django.views.defaults import bad_request as django_bad_request

    return django_bad_request(request, exception)


@require_GET
def healthz(request) -> JsonResponse:
    """Liveness for a load balancer: the web process answers and reaches its database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    queue = queue_report()
    # Still 200: the web process is alive. "degraded" says the worker (or its queue) is not, so nothing gets done.
    return JsonResponse(
        {
            "status": "ok" if queue.worker_ok and not queue.error else "degraded",
            "worker_ok": queue.worker_ok,
            "worker_seen": queue.worker_seen.isoformat() if queue.worker_seen else None,
            "queue_waiting": queue.waiting,
            "queue_error": queue.error,
        }
    )


@staff_required
@require_GET
def audit_list(request) -> HttpResponse:
    """Staff: the audit trail, filtered by user, action, object type, outcome and a date range."""
    filters = {k: request.GET.get(k, "").strip() for k in audit_export.FILTERS}
    try:
        events = audit_export.audit_events(filters)
    except ValidationError as e:
        for message in e.messages:
            messages.error(request, message)
        events = AuditEvent.objects.none()
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    return render(
        request,
        "portal/audit.html",
        {
            "page": page,
            "filters": filters,
            "query": urlencode({k: v for k, v in filters.items() if v}),
            "outcomes": AuditEvent.Outcome.choices,
            "actions": AuditEvent.objects.order_by("action").values_list("action", flat=True).distinct(),
            "object_types": AuditEvent.objects.exclude(object_type="")
            .order_by("object_type")
            .values_list("object_type", flat=True)
            .distinct(),
        },
    )


def _audit_export(request, fmt: str) -> HttpResponseBase:
    """Staff: the filtered trail as a streamed download; the export is recorded too."""
    try:
        events = audit_export.audit_events(request.GET)
    except ValidationError as e:
        return HttpResponse("; ".join(e.messages), status=400, content_type="text/plain; charset=utf-8")
    shown = ", ".join(f"{k}={request.GET[k]}" for k in audit_export.FILTERS if request.GET.get(k))
    audit.record("audit.export", request=request, detail=f"{fmt}" + (f": {shown}" if shown else ""))
    return audit_export.export_response(events, fmt)


@staff_required
@require_GET
def audit_export_csv(request) -> HttpResponseBase:
    return _audit_export(request, "csv")


@staff_required
@require_GET
def audit_export_json(request) -> HttpResponseBase:
    return _audit_export(request, "json")

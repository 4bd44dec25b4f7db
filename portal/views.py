from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from hypervisors.models import Hypervisor, HypervisorStatus


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

"""The graphs' JSON for the portal's own pages (the machine and hypervisor pages poll it): the same answers
as the API's metrics routes (metrics/api.py), for a session, with the errors as {"detail": …}."""

from django.contrib.auth.decorators import login_required
from django.http import Http404, JsonResponse
from django.views.decorators.http import require_GET

from hypervisors.models import Hypervisor
from metrics import series
from metrics.access import MAX_ID, machine_visible
from portal.decorators import staff_required


def _window(request) -> tuple[series.Window, int | None]:
    return series.window_named(request.GET.get("window")), series.since_value(request.GET.get("since"))


def _answer(read, pk: int, request) -> JsonResponse:
    try:
        window, since = _window(request)
    except series.BadWindow as e:
        return JsonResponse({"detail": str(e)}, status=400)
    response = JsonResponse(read(pk, window, since=since))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def machine_data(request, pk: int) -> JsonResponse:
    if not machine_visible(request.user, pk):
        raise Http404("No such machine.")
    return _answer(series.machine_series, pk, request)


@staff_required
@require_GET
def hypervisor_data(request, pk: int) -> JsonResponse:
    if not (pk <= MAX_ID and Hypervisor.objects.filter(pk=pk).exists()):
        raise Http404("No such hypervisor.")
    return _answer(series.host_series, pk, request)

"""`GET /api/v1/machines/{id}/metrics/` and `GET /api/v1/hypervisors/{id}/metrics/`: a machine's or a
hypervisor's points over a window (metrics.series), columnar as uPlot reads them. Routed in config/urls.py
ahead of the router, so that machines.api knows nothing of metrics."""

from collections.abc import Callable

from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from hypervisors.models import Hypervisor
from metrics import series
from metrics.access import MAX_ID, machine_visible


class WindowQuerySerializer(serializers.Serializer):
    window = serializers.ChoiceField(
        choices=list(series.WINDOWS),
        required=False,
        default=series.DEFAULT_WINDOW,
        help_text="hour and day: one-minute points (60 and 1,440); month: hourly points (720).",
    )
    since = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=10**11,
        help_text="Epoch seconds: only the slots after it (a page's live update).",
    )


class SeriesSerializer(serializers.Serializer):
    window = serializers.ChoiceField(choices=list(series.WINDOWS))
    step = serializers.IntegerField(help_text="Seconds between slots.")
    start = serializers.IntegerField(help_text="Epoch seconds of the first slot.")
    end = serializers.IntegerField(help_text="Epoch seconds of the last slot (the last interval that is over).")
    since = serializers.IntegerField(allow_null=True)
    timestamps = serializers.ListField(child=serializers.IntegerField(), help_text="Each slot's start, epoch seconds.")
    series = serializers.DictField(
        child=serializers.ListField(child=serializers.FloatField(allow_null=True)),
        help_text="One list per measure, a value per slot; null where nothing was measured (a gap).",
    )


class _MetricsView(APIView):
    read: Callable[..., dict]

    def visible(self, request, pk: int) -> bool:
        raise NotImplementedError

    def get(self, request, id: int):
        if not self.visible(request, id):
            raise NotFound()
        query = WindowQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        window = series.WINDOWS[query.validated_data["window"]]
        response = Response(self.read(id, window, since=query.validated_data.get("since")))
        response["Cache-Control"] = "no-store"
        return response


class MachineMetricsView(_MetricsView):
    """A machine's CPU %, memory used and given (MiB), disk read/write (bytes/s, IOPS) and network rx/tx
    (bytes/s), for whoever may see the machine."""

    read = staticmethod(series.machine_series)

    def visible(self, request, pk: int) -> bool:
        return machine_visible(request.user, pk)

    @extend_schema(
        operation_id="machine_metrics", parameters=[WindowQuerySerializer], responses={200: SeriesSerializer}
    )
    def get(self, request, id: int):
        return super().get(request, id)


class HypervisorMetricsView(_MetricsView):
    """A hypervisor's CPU % and memory, and vCPUs, memory and disk given to machines against its capacity
    (staff)."""

    permission_classes = [permissions.IsAdminUser]
    read = staticmethod(series.host_series)

    def visible(self, request, pk: int) -> bool:
        return pk <= MAX_ID and Hypervisor.objects.filter(pk=pk).exists()

    @extend_schema(
        operation_id="hypervisor_metrics", parameters=[WindowQuerySerializer], responses={200: SeriesSerializer}
    )
    def get(self, request, id: int):
        return super().get(request, id)

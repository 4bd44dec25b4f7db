from django.core.exceptions import ValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import permissions, renderers, serializers, viewsets
from rest_framework.decorators import action

from portal import audit, audit_export
from portal.models import AuditEvent

FILTER_PARAMETERS = [
    OpenApiParameter("user", str, description="user name"),
    OpenApiParameter("action", str, description="action prefix (`machine` is every machine action)"),
    OpenApiParameter("object_type", str, description="e.g. `machines.machine`"),
    OpenApiParameter("outcome", str, enum=AuditEvent.Outcome.values),
    OpenApiParameter("since", OpenApiTypes.DATE, description="from this day on"),
    OpenApiParameter("until", OpenApiTypes.DATE, description="up to this day, included"),
]


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = list(audit_export.COLUMNS)


class _Download(renderers.JSONRenderer):
    """The exports answer with their own streamed body; this lets any Accept header (text/csv) reach them,
    and renders a refusal (a bad date) as JSON."""

    media_type = "*/*"
    format = "download"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        # What this renders is JSON (a refusal): say so, not "*/*" (found by the API fuzzer).
        response = (renderer_context or {}).get("response")
        if response is not None:
            response["Content-Type"] = "application/json"
        return super().render(data, accepted_media_type, renderer_context)


@extend_schema_view(list=extend_schema(parameters=FILTER_PARAMETERS))
class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    """Staff: the audit trail, newest first. Filter with ?user=, ?action= (prefix), ?object_type=, ?outcome=,
    ?since= and ?until= (YYYY-MM-DD). Read-only: nothing here (or anywhere) changes or deletes a row."""

    serializer_class = AuditEventSerializer
    permission_classes = [permissions.IsAdminUser]

    def get_queryset(self):
        if self.action != "list":
            return AuditEvent.objects.all()
        try:
            return audit_export.audit_events(self.request.query_params)
        except ValidationError as e:
            raise serializers.ValidationError(e.message_dict) from None

    @extend_schema(
        parameters=FILTER_PARAMETERS,
        responses={(200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="CSV, one row per event")},
    )
    @action(detail=False, methods=["get"], url_path="export/csv", renderer_classes=[renderers.JSONRenderer, _Download])
    def export_csv(self, request):
        """The filtered trail as CSV, streamed; the export is recorded."""
        return self._export(request, "csv")

    @extend_schema(parameters=FILTER_PARAMETERS, responses={200: AuditEventSerializer(many=True)})
    @action(
        detail=False,
        methods=["get"],
        url_path="export/json",
        renderer_classes=[renderers.JSONRenderer, _Download],
        pagination_class=None,  # one array, as the schema says (it said a page)
    )
    def export_json(self, request):
        """The filtered trail as one JSON array (unpaginated), streamed; the export is recorded."""
        return self._export(request, "json")

    def _export(self, request, fmt: str):
        try:
            events = audit_export.audit_events(request.query_params)
        except ValidationError as e:
            raise serializers.ValidationError(e.message_dict) from None
        shown = ", ".join(f"{k}={request.query_params[k]}" for k in audit_export.FILTERS if request.query_params.get(k))
        audit.record("audit.export", request=request, detail=fmt + (f": {shown}" if shown else ""))
        return audit_export.export_response(events, fmt)

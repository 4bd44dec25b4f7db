"""`GET /api/v1/usage/?month=YYYY-MM&by=project|user`: the usage report (metrics.usage) as JSON, for staff and
project admins (their projects only); anyone else 403."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from metrics import usage


class UsageQuerySerializer(serializers.Serializer):
    month = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=7,
        help_text="YYYY-MM, in the portal's time zone; empty: this month.",
    )
    by = serializers.ChoiceField(choices=usage.BY, required=False, default="project")

    def validate_month(self, value: str) -> usage.Month:
        try:
            return usage.month_of(value)
        except DjangoValidationError as e:
            raise serializers.ValidationError(e.messages) from None


class UsageFiguresSerializer(serializers.Serializer):
    vcpu_hours = serializers.FloatField(help_text="vCPUs times hours running.")
    memory_gib_hours = serializers.FloatField(help_text="Memory (GiB) times hours running.")
    disk_gib_days = serializers.FloatField(help_text="Disk (GiB) times days it existed.")


class UsageRowSerializer(UsageFiguresSerializer):
    id = serializers.IntegerField(allow_null=True, help_text="The project's or user's id; null: deleted or none.")
    name = serializers.CharField()
    machines = serializers.IntegerField(help_text="Distinct machines that used anything.")


class UsageReportSerializer(serializers.Serializer):
    month = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    by = serializers.ChoiceField(choices=usage.BY)
    rows = UsageRowSerializer(many=True)
    total = UsageFiguresSerializer()


class UsageView(APIView):
    """A month's usage per project or per user: vCPU-hours, memory GiB-hours, disk GiB-days."""

    @extend_schema(
        operation_id="usage_retrieve", parameters=[UsageQuerySerializer], responses={200: UsageReportSerializer}
    )
    def get(self, request):
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        month = query.validated_data.get("month") or usage.month_of("")
        by = query.validated_data["by"]
        try:
            rows = usage.report(request.user, month, by)
        except PermissionDenied as e:
            raise exceptions.PermissionDenied(str(e)) from None
        body = {
            "month": month.label,
            "start": month.start,
            "end": month.end,
            "by": by,
            "rows": rows,
            "total": usage.total(rows),
        }
        return Response(UsageReportSerializer(body).data)

"""The JSON API of scheduled actions (labs/schedules.py): GET and POST /api/v1/machines/{id}/schedules/, DELETE
/api/v1/machines/{id}/schedules/{sid}/, and the same under /api/v1/labs/{id}/. They live here, not in the
machines' API, because ScheduledAction is a labs model (machines import nothing from labs)."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from labs import schedules
from labs.api import _drf_error
from labs.models import ScheduledAction
from labs.services import labs_for
from machines.access import machines_for


class ScheduleSerializer(serializers.ModelSerializer):
    """A scheduled action: at hour:minute (the portal's time zone) on `weekdays` (0 = Monday; empty: every day)."""

    action = serializers.ChoiceField(choices=ScheduledAction.Action.choices)
    hour = serializers.IntegerField(min_value=0, max_value=23)
    minute = serializers.IntegerField(min_value=0, max_value=59)
    weekdays = serializers.ListField(
        child=serializers.IntegerField(min_value=0, max_value=6), max_length=7, required=False, default=list
    )
    retention = serializers.IntegerField(
        min_value=1, max_value=schedules.MAX_RETENTION, required=False, default=3, help_text="Snapshots to keep."
    )
    created_by = serializers.CharField(source="created_by.username", read_only=True)

    class Meta:
        model = ScheduledAction
        fields = [
            "id",
            "machine",
            "lab",
            "action",
            "hour",
            "minute",
            "weekdays",
            "retention",
            "enabled",
            "last_run",
            "last_result",
            "created",
            "created_by",
        ]
        read_only_fields = ["id", "machine", "lab", "enabled", "last_run", "last_result", "created", "created_by"]


ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH, description="The machine's or lab's id.")
SID = OpenApiParameter("sid", OpenApiTypes.INT, OpenApiParameter.PATH, description="The schedule's id.")


class _Schedules(mixins.ListModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = ScheduleSerializer
    lookup_url_kwarg = "sid"
    lookup_value_regex = "[0-9]+"
    pagination_class = None
    target = ""  # "machine" or "lab"

    def _target(self):
        visible = machines_for(self.request.user) if self.target == "machine" else labs_for(self.request.user)
        try:
            return get_object_or_404(visible, pk=int(self.kwargs["id"]))
        except (ValueError, OverflowError):
            raise Http404 from None

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ScheduledAction.objects.none()
        return ScheduledAction.objects.filter(**{self.target: self._target()}).select_related("created_by")

    def create(self, request, *args, **kwargs):
        target = self._target()
        s = ScheduleSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        data = {k: v for k, v in s.validated_data.items()}
        try:
            schedule = schedules.schedule_create(actor=request.user, **{self.target: target}, **data)
        except DjangoValidationError as e:
            raise _drf_error(e) from None
        return Response(ScheduleSerializer(schedule).data, status=status.HTTP_201_CREATED)

    def destroy(self, request, *args, **kwargs):
        schedules.schedule_delete(schedule=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


_DOCS = {
    "list": extend_schema(parameters=[ID], responses={200: ScheduleSerializer(many=True)}),
    "create": extend_schema(parameters=[ID], request=ScheduleSerializer, responses={201: ScheduleSerializer}),
    "destroy": extend_schema(parameters=[ID, SID], responses={204: None}),
}


@extend_schema_view(**_DOCS)
class MachineScheduleViewSet(_Schedules):
    """A machine's scheduled actions; its operators make and delete them."""

    target = "machine"


@extend_schema_view(**_DOCS)
class LabScheduleViewSet(_Schedules):
    """A lab's scheduled actions, run on every machine of the lab; the lab's operators make and delete them."""

    target = "lab"

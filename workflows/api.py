"""The workflows' JSON API: the catalogue (and registration, for staff and project admins), a run started on
machines and/or a lab (POST /api/v1/workflows/{id}/runs/), and runs with their events (?after=<counter> for what
came since) and cancel. The same services and the same visibility as the pages decide."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Q
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from hypervisors.api import DetailSerializer
from labs.services import labs_for
from machines.access import machines_for
from machines.models import Project
from workflows import access, services
from workflows.models import Workflow, WorkflowEvent, WorkflowRun

MAX_EVENTS = 1000  # events in one answer; ask again with ?after= for the rest
MAX_ID = 2**31 - 1


def _drf_error(e: DjangoValidationError) -> serializers.ValidationError:
    return serializers.ValidationError(e.message_dict if hasattr(e, "error_dict") else {"non_field_errors": e.messages})


class VariableSpecSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    type = serializers.ChoiceField(choices=["string", "integer", "boolean", "choice"], default="string")
    default = serializers.JSONField(required=False, allow_null=True)
    required = serializers.BooleanField(default=False)  # type: ignore[assignment]  # a key of the schema
    secret = serializers.BooleanField(default=False)
    choices = serializers.ListField(child=serializers.JSONField(), required=False)
    help = serializers.CharField(max_length=500, required=False, allow_blank=True)


class WorkflowSerializer(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Project.objects.all(),
        required=False,
        allow_null=True,
        help_text="Project name (its admins register it); left out: offered to everyone (staff only).",
    )
    variables = VariableSpecSerializer(many=True, required=False)
    groups = serializers.ListField(child=serializers.CharField(max_length=100), required=False, max_length=100)

    class Meta:
        model = Workflow
        fields = [
            "id",
            "name",
            "description",
            "project",
            "source",
            "directory",
            "git_url",
            "git_ref",
            "playbook",
            "variables",
            "groups",
            "enabled",
            "created",
            "updated",
        ]
        read_only_fields = ["enabled", "created", "updated"]
        validators: list = []  # the service validates (names unique in a project)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        for spec in data.get("variables") or ():
            if spec.get("secret"):
                spec.pop("default", None)  # a secret's default is not for every reader of the catalogue
        return data

    def create(self, validated):
        user = self.context["request"].user
        if not access.may_write(user, validated.get("project")):
            raise PermissionDenied("Only staff register workflows for everyone; a project's admins for their project.")
        variables = [dict(v) for v in validated.pop("variables", [])]
        try:
            return services.workflow_register(actor=user, variables=variables, **validated)
        except DjangoValidationError as e:
            raise _drf_error(e) from None
        except services.WorkflowRefused as e:
            raise serializers.ValidationError({"non_field_errors": [str(e)]}) from None


class RunStartSerializer(serializers.Serializer):
    machines = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        max_length=1000,
        help_text="Ids of machines to run against.",
    )
    lab = serializers.IntegerField(
        min_value=1, max_value=MAX_ID, required=False, allow_null=True, help_text="A lab's id: all its machines."
    )
    variables = serializers.DictField(child=serializers.JSONField(), required=False, help_text="Name -> value.")

    def validate(self, data):
        user = self.context["request"].user
        ids = list(dict.fromkeys(data.get("machines") or ()))
        machines = list(machines_for(user).filter(pk__in=ids))
        missing = sorted(set(ids) - {m.pk for m in machines})
        if missing:
            raise serializers.ValidationError({"machines": [f"No machine {', '.join(map(str, missing))}."]})
        lab = None
        if data.get("lab") is not None:
            lab = labs_for(user).filter(pk=data["lab"]).first()
            if lab is None:
                raise serializers.ValidationError({"lab": [f"No lab {data['lab']}."]})
        if not machines and lab is None:
            raise serializers.ValidationError({"non_field_errors": ["Name machines or a lab to run against."]})
        return {"machines": machines, "lab": lab, "variables": data.get("variables") or {}}


class WorkflowEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = WorkflowEvent
        fields = ["counter", "created", "event", "host", "task", "status", "stdout", "data"]
        read_only_fields = fields


class WorkflowRunSerializer(serializers.ModelSerializer):
    workflow: serializers.PrimaryKeyRelatedField = serializers.PrimaryKeyRelatedField(read_only=True)
    workflow_name = serializers.CharField(source="workflow.name", read_only=True)
    created_by = serializers.CharField(source="created_by.username", read_only=True)
    project: serializers.SlugRelatedField = serializers.SlugRelatedField(slug_field="name", read_only=True)
    machines: serializers.ManyRelatedField = serializers.ManyRelatedField(
        child_relation=serializers.PrimaryKeyRelatedField(read_only=True), read_only=True
    )
    lab: serializers.PrimaryKeyRelatedField = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)

    class Meta:
        model = WorkflowRun
        # The run's shown fields without the log (GET .../events/ pages it) and the worker's attempt.
        fields = [
            "id",
            "workflow_name",
            *(f for f in WorkflowRun.SHOWN_FIELDS if f not in ("stdout", "attempt_id")),
        ]
        read_only_fields = fields


class WorkflowRunDetailSerializer(WorkflowRunSerializer):
    events = serializers.SerializerMethodField()
    stdout = serializers.CharField(read_only=True, help_text="The whole log, secrets masked.")

    class Meta(WorkflowRunSerializer.Meta):
        fields = [*WorkflowRunSerializer.Meta.fields, "events", "stdout"]
        read_only_fields = fields

    @extend_schema_field(WorkflowEventSerializer(many=True))
    def get_events(self, run) -> list:
        after = self.context.get("after", -1)
        events = run.events.filter(counter__gt=after).order_by("counter")[:MAX_EVENTS]
        return list(WorkflowEventSerializer(events, many=True).data)


class WorkflowChangeSerializer(WorkflowSerializer):
    """PATCH: the fields given change, the others stay; `enabled` too (a disabled workflow offers no runs)."""

    class Meta(WorkflowSerializer.Meta):
        read_only_fields = ["created", "updated"]


def _refused(e: Exception) -> Response:
    code = status.HTTP_403_FORBIDDEN if isinstance(e, PermissionDenied) else status.HTTP_409_CONFLICT
    return Response({"detail": str(e)}, status=code)


class WorkflowViewSet(mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Workflows you may run (those for everyone and your projects'; staff: all). Staff and a project's admins
    register them. POST .../runs/ starts a run."""

    serializer_class = WorkflowSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Workflow.objects.none()
        user = self.request.user
        if self.action in ("partial_update", "destroy"):  # a project's admins also reach its disabled ones
            mine = Q(pk__in=access.workflows_for(user).values("pk")) | Q(project__in=access.writable_projects(user))
            return Workflow.objects.select_related("project").filter(mine).order_by("name", "pk")
        return access.workflows_for(user).order_by("name", "pk")

    @extend_schema(
        request=WorkflowChangeSerializer,
        responses={200: WorkflowSerializer, 403: DetailSerializer},
    )
    def partial_update(self, request, *args, **kwargs):
        """Change a workflow (staff; a project's admins their project's): the fields given, the rest kept."""
        workflow = self.get_object()
        if not access.may_write(request.user, workflow.project):
            return _refused(PermissionDenied("Only staff or the project's admins change this workflow."))
        s = WorkflowChangeSerializer(workflow, data=request.data, partial=True, context={"request": request})
        s.is_valid(raise_exception=True)
        fields = {
            "name": workflow.name,
            "description": workflow.description,
            "project": workflow.project,
            "source": workflow.source,
            "directory": workflow.directory,
            "git_url": workflow.git_url,
            "git_ref": workflow.git_ref,
            "playbook": workflow.playbook,
            "variables": workflow.variables,
            "groups": workflow.groups,
            "enabled": workflow.enabled,
        }
        fields.update(s.validated_data)
        fields["variables"] = [dict(v) for v in fields["variables"]]
        try:
            workflow = services.workflow_update(workflow=workflow, actor=request.user, **fields)
        except DjangoValidationError as e:
            raise _drf_error(e) from None
        except services.WorkflowRefused as e:
            raise serializers.ValidationError({"non_field_errors": [str(e)]}) from None
        return Response(WorkflowSerializer(workflow, context={"request": request}).data)

    @extend_schema(responses={204: None, 403: DetailSerializer, 409: DetailSerializer})
    def destroy(self, request, *args, **kwargs):
        """Remove a workflow that never ran (staff; a project's admins their project's). One with runs keeps
        them on record: 409, disable it instead (PATCH `enabled: false`)."""
        workflow = self.get_object()
        if not access.may_write(request.user, workflow.project):
            return _refused(PermissionDenied("Only staff or the project's admins remove this workflow."))
        try:
            services.workflow_delete(workflow=workflow, actor=request.user)
        except services.WorkflowRefused as e:
            return _refused(e)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        request=RunStartSerializer,
        responses={201: WorkflowRunSerializer, 403: DetailSerializer, 409: DetailSerializer},
    )
    @action(detail=True, methods=["post"], serializer_class=RunStartSerializer)
    def runs(self, request, pk=None):
        """Start a run on machines and/or a lab (every machine of it you may see) with these variables (checked
        against the workflow's; secrets are kept encrypted, never answered). Needs the operator role on each."""
        workflow = self.get_object()
        s = RunStartSerializer(data=request.data, context={"request": request})
        s.is_valid(raise_exception=True)
        try:
            run = services.workflow_run_start(workflow=workflow, actor=request.user, **s.validated_data)
        except DjangoValidationError as e:
            raise _drf_error(e) from None
        except (services.WorkflowRefused, PermissionDenied) as e:
            return _refused(e)
        return Response(WorkflowRunSerializer(run).data, status=status.HTTP_201_CREATED)


AFTER = OpenApiParameter(
    "after", OpenApiTypes.INT, description="Only the events after this counter (what came since the last read)."
)


class WorkflowRunViewSet(viewsets.ReadOnlyModelViewSet):
    """Runs you may see: your own and your projects' (none that touched a machine you may not see); staff: all.
    One run comes with its events (at most 1000; ?after=<counter> for the next ones) and its log."""

    serializer_class = WorkflowRunSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return WorkflowRun.objects.none()
        return access.runs_for(self.request.user).prefetch_related("machines").order_by("-created", "-pk")

    def get_serializer_class(self):
        return WorkflowRunDetailSerializer if self.action == "retrieve" else WorkflowRunSerializer

    @extend_schema(parameters=[AFTER], responses={200: WorkflowRunDetailSerializer})
    def retrieve(self, request, *args, **kwargs):
        after = serializers.IntegerField(min_value=-1, max_value=MAX_ID, required=False)
        raw = request.query_params.get("after")
        value = -1
        if raw not in (None, ""):
            try:
                value = after.run_validation(raw)
            except serializers.ValidationError as e:
                raise serializers.ValidationError({"after": e.detail}) from None
        run = self.get_object()
        return Response(WorkflowRunDetailSerializer(run, context={"request": request, "after": value}).data)

    @extend_schema(request=None, responses={202: WorkflowRunSerializer, 403: DetailSerializer, 409: DetailSerializer})
    @action(detail=True, methods=["post"], serializer_class=WorkflowRunSerializer)
    def cancel(self, request, pk=None):
        """Stop a queued or running run and its processes (the operator role on every machine it runs on)."""
        run = self.get_object()
        if not access.may_operate(request.user, run):
            return _refused(PermissionDenied("Cancelling a run takes the operator role on every machine it runs on."))
        try:
            services.workflow_run_cancel(run=run, actor=request.user)
        except (services.WorkflowRefused, PermissionDenied) as e:
            return _refused(e)
        run.refresh_from_db()
        return Response(WorkflowRunSerializer(run).data, status=status.HTTP_202_ACCEPTED)

"""The labs' JSON API: labs with their machines (only those you may see), a lab made from a template, power and
delete on a lab, its instackenv.json; lab templates. The same services as the pages decide."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Prefetch
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from hypervisors.api import DetailSerializer
from labs import services, specs
from labs.models import Lab, LabMachine, LabTemplate
from machines.access import machines_for
from machines.api import InstackenvSerializer, LeaseSerializer
from machines.leases import LeaseRefused
from machines.models import Machine, Project
from machines.states import PowerAction


def _drf_error(e: DjangoValidationError) -> serializers.ValidationError:
    return serializers.ValidationError(e.message_dict if hasattr(e, "error_dict") else {"non_field_errors": e.messages})


class LabMachineSerializer(serializers.ModelSerializer):
    group = serializers.CharField(source="lab_membership.group", read_only=True)
    hypervisor = serializers.CharField(source="hypervisor.name", read_only=True)

    class Meta:
        model = Machine
        fields = [
            "id",
            "name",
            "group",
            "deploy_type",
            "status",
            "power_state",
            "operation",
            "hypervisor",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "bmc_address",
            "bmc_port",
        ]
        read_only_fields = fields


class GroupParamsSerializer(serializers.Serializer):
    count = serializers.IntegerField(min_value=0, max_value=specs.MAX_COUNT, required=False)
    pattern = serializers.CharField(max_length=100, required=False, help_text="{lab}, {group}, {n} or {n:02d}.")
    offsets = serializers.DictField(
        child=serializers.IntegerField(min_value=0, max_value=1 << 16),
        required=False,
        help_text="Network name -> offset: a static address is the network's address + offset + n.",
    )


class VisibleTemplateField(serializers.PrimaryKeyRelatedField):
    """A template by id, among those the requesting user may use: any other id does not exist for them."""

    def get_queryset(self):
        request = self.context.get("request")
        return services.templates_for(request.user) if request is not None else LabTemplate.objects.none()


class LabSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    project = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Project.objects.all(),
        required=False,
        allow_null=True,
        help_text="Project name; you must be its admin.",
    )
    machines = serializers.SerializerMethodField()
    template = VisibleTemplateField(write_only=True, help_text="The template's id (one you may use).")
    placement = serializers.ChoiceField(choices=list(services.PLACEMENTS), default=services.SPREAD, write_only=True)
    first = serializers.IntegerField(min_value=0, max_value=9999, default=0, write_only=True)
    saved_keys = serializers.BooleanField(
        default=True, write_only=True, help_text="Put your saved SSH keys on the image machines."
    )
    groups = serializers.DictField(
        child=GroupParamsSerializer(),
        required=False,
        write_only=True,
        help_text="Per group of the template: count, name pattern and address offsets (left out: the template's).",
    )

    class Meta:
        model = Lab
        fields = [
            "id",
            "name",
            "description",
            "owner",
            "project",
            "source",
            "created",
            "machines",
            "template",
            "placement",
            "first",
            "saved_keys",
            "groups",
            "expires_at",
        ]
        read_only_fields = ["source", "created", "expires_at"]
        validators: list = []  # the service validates (names in a project or per owner)

    @extend_schema_field(LabMachineSerializer(many=True))
    def get_machines(self, lab) -> list:
        request = self.context.get("request")
        if request is None:
            return []
        members = getattr(lab, "visible_members", None)  # prefetched for the list and the detail
        if members is not None:
            machines = [m.machine for m in members]
        else:
            machines = list(services.lab_machines(lab, request.user).select_related("lab_membership"))
        return list(LabMachineSerializer(machines, many=True).data)

    def create(self, validated):
        groups = validated.pop("groups", {}) or {}
        user = self.context["request"].user
        template = validated.pop("template")
        try:
            return services.lab_instantiate(
                template=template,
                actor=user,
                counts={g: p["count"] for g, p in groups.items() if "count" in p},
                patterns={g: p["pattern"] for g, p in groups.items() if "pattern" in p},
                offsets={g: p["offsets"] for g, p in groups.items() if "offsets" in p},
                **validated,
            )
        except DjangoValidationError as e:
            raise _drf_error(e) from None


class LabPowerSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=PowerAction.choices)


class LabResultSerializer(serializers.Serializer):
    done = serializers.ListField(child=serializers.CharField(), help_text="Machines whose action was queued.")
    refused = serializers.ListField(child=serializers.CharField(), help_text="'name: why' for each refused.")


class LabChangeSerializer(serializers.Serializer):
    name = serializers.CharField(required=False, max_length=63, help_text="A new name (a host-name-like label).")
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000)


class LabViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Labs you may see (your own, your projects'; staff: all), each with the machines of it you may see. Create
    one from a template: the whole lab is quota-checked and placed before anything is made."""

    serializer_class = LabSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Lab.objects.none()
        labs = services.labs_for(self.request.user).order_by("name", "pk")
        if self.action not in ("list", "retrieve"):
            return labs
        # The machines of every lab on the page that the user may see, in one query.
        visible = LabMachine.objects.filter(machine__in=machines_for(self.request.user).values("pk"))
        visible = visible.select_related("machine__hypervisor").order_by("group", "machine__name")
        return labs.prefetch_related(Prefetch("members", queryset=visible, to_attr="visible_members"))

    @extend_schema(request=LabChangeSerializer, responses={200: LabSerializer, 403: DetailSerializer})
    def partial_update(self, request, *args, **kwargs):
        """Rename the lab or change its description (its admins); its machines keep their names."""
        s = LabChangeSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        lab = self.get_object()
        try:
            services.lab_change(lab=lab, actor=request.user, **s.validated_data)
        except DjangoValidationError as e:
            raise _drf_error(e) from None
        except PermissionDenied as e:
            return Response({"detail": str(e)}, status=status.HTTP_403_FORBIDDEN)
        return Response(LabSerializer(Lab.objects.get(pk=lab.pk), context=self.get_serializer_context()).data)

    @extend_schema(responses={202: DetailSerializer, 403: DetailSerializer, 409: DetailSerializer})
    def destroy(self, request, *args, **kwargs):
        """Delete every machine of the lab, then the lab (refused, touching nothing, while any is protected)."""
        lab = self.get_object()
        try:
            names = services.lab_delete(lab=lab, actor=request.user)
        except services.LabError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        except PermissionDenied as e:
            return Response({"detail": str(e)}, status=status.HTTP_403_FORBIDDEN)
        return Response({"detail": f"deleting {', '.join(names) or 'an empty lab'}"}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=LabPowerSerializer,
        responses={202: LabResultSerializer, 403: DetailSerializer, 409: DetailSerializer},
    )
    @action(detail=True, methods=["post"], serializer_class=LabPowerSerializer)
    def power(self, request, pk=None):
        """Start, shut down, power off, reboot or reset every machine of the lab you may see (each checked on its
        own: what is refused is said per machine)."""
        s = LabPowerSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        lab = self.get_object()
        try:
            result = services.lab_power(lab=lab, action=s.validated_data["action"], actor=request.user)
        except services.LabError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        except PermissionDenied as e:
            return Response({"detail": str(e)}, status=status.HTTP_403_FORBIDDEN)
        return Response(LabResultSerializer(result).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=LeaseSerializer, responses={200: LabSerializer})
    @action(detail=True, methods=["post"], serializer_class=LeaseSerializer)
    def lease(self, request, pk=None):
        """Set or extend the lab's lease and its machines' with it (labs.services.lab_set_lease)."""
        s = LeaseSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        lab = self.get_object()
        try:
            services.lab_set_lease(lab=lab, actor=request.user, until=s.validated_data["until"])
        except LeaseRefused as e:
            raise serializers.ValidationError({"until": [str(e)]}) from None
        return Response(LabSerializer(Lab.objects.get(pk=lab.pk), context=self.get_serializer_context()).data)

    @extend_schema(request=None, responses={200: InstackenvSerializer})
    @action(detail=True, methods=["get"], serializer_class=InstackenvSerializer)
    def instackenv(self, request, pk=None):
        """Ironic / TripleO instackenv.json of the lab's network-boot machines whose BMC credentials you may see.
        Holds BMC passwords: every machine exported is recorded in its events and the audit trail."""
        lab = self.get_object()
        response = Response(services.lab_instackenv(lab=lab, user=request.user))
        response["Cache-Control"] = "no-store"
        return response


class LabTemplateSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    project = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Project.objects.all(),
        required=False,
        allow_null=True,
        help_text="Project name (its admins write it); left out: a template for everyone (staff only).",
    )
    spec = serializers.CharField(
        max_length=specs.MAX_SPEC_BYTES, help_text=LabTemplate._meta.get_field("spec").help_text
    )
    groups = serializers.SerializerMethodField()
    notes = serializers.SerializerMethodField()

    class Meta:
        model = LabTemplate
        fields = ["id", "name", "description", "owner", "project", "spec", "groups", "notes", "created", "updated"]
        read_only_fields = ["created", "updated"]
        validators: list = []

    def _spec(self, template) -> specs.Spec | None:
        try:
            return specs.parse(template.spec)
        except specs.SpecError:
            return None

    def get_groups(self, template) -> list[dict]:
        spec = self._spec(template)
        return [
            {"name": g.name, "deploy_type": g.deploy_type, "count": g.count, "pattern": g.pattern}
            for g in (spec.groups if spec else ())
        ]

    def get_notes(self, template) -> list[str]:
        spec = self._spec(template)
        return list(spec.notes) if spec else []

    def _save(self, validated, template=None):
        data = {
            "name": validated.get("name", template.name if template else ""),
            "description": validated.get("description", template.description if template else ""),
            "project": validated.get("project", template.project if template else None),
            "spec": validated.get("spec", template.spec if template else ""),
        }
        try:
            return services.lab_template_save(actor=self.context["request"].user, template=template, **data)
        except DjangoValidationError as e:
            raise _drf_error(e) from None

    def create(self, validated):
        return self._save(validated)

    def update(self, instance, validated):
        return self._save(validated, instance)


class LabTemplateViewSet(viewsets.ModelViewSet):
    """Lab templates you may use (staff's for everyone, your projects'); staff and a project's admins write them."""

    serializer_class = LabTemplateSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return LabTemplate.objects.none()
        return services.templates_for(self.request.user).order_by("name", "pk")

    def perform_destroy(self, instance):
        services.lab_template_delete(template=instance, actor=self.request.user)

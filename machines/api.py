from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Prefetch
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from hypervisors.api import DetailSerializer, HypervisorSerializer, ImageSerializer
from hypervisors.models import Hypervisor, Image
from machines import access, consoles, leases, macs, policy, services
from machines.access import machines_for
from machines.models import Machine, MachineEvent, MachineNic, MachineSnapshot, Project
from machines.states import PowerAction


@extend_schema_field(OpenApiTypes.STR)  # given as an id or a name, answered as the name
class NameOrIdField(serializers.RelatedField):
    """A hypervisor by id or by name."""

    def to_internal_value(self, data):
        qs = self.get_queryset()
        assert qs is not None  # declared with a queryset
        try:
            return qs.get(pk=int(data)) if str(data).isdigit() else qs.get(name=data)
        except (Hypervisor.DoesNotExist, ValueError, TypeError):
            raise serializers.ValidationError(f"No hypervisor {data!r}.") from None

    def to_representation(self, value):
        return value.name


class NicSerializer(serializers.ModelSerializer):
    mac = serializers.CharField(required=False, allow_blank=True, help_text="Generated when empty.")
    addresses = serializers.ListField(child=serializers.CharField(), required=False)
    nameservers = serializers.ListField(child=serializers.CharField(), required=False)
    search = serializers.ListField(child=serializers.CharField(), required=False)

    class Meta:
        model = MachineNic
        fields = [
            "type",
            "source",
            "mac",
            "dhcp4",
            "dhcp6",
            "addresses",
            "gateway4",
            "gateway6",
            "nameservers",
            "search",
            "model",
            "mode",
            "vlan",
        ]
        extra_kwargs: dict[str, dict[str, Any]] = {"mac": {"validators": []}}

    def validate_mac(self, value: str) -> str:
        """The one MAC rule (machines.macs); uniqueness is the service's, which sees every NIC."""
        try:
            return macs.normalise_mac(value) if value else value
        except macs.InvalidMac as e:
            raise serializers.ValidationError(f"MAC address {e}") from None


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = MachineEvent
        fields = ["created", "step", "message", "level"]


@extend_schema_field(
    {
        "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
        "description": "Answered as a list.",
    }
)
class StringOrList(serializers.Field):
    """Accepts a list of strings or one string (lines); returns the newline-joined text."""

    def to_internal_value(self, data):
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return "\n".join(data)
        if isinstance(data, str):
            return data
        raise serializers.ValidationError("Give a list of strings.")

    def to_representation(self, value):
        return (
            [line for line in value.split() if line]
            if self.field_name == "packages"
            else [line.strip() for line in value.splitlines() if line.strip()]
        )


RECENT_EVENTS, RECENT_EVENTS_ORDER = 50, ("-created", "-pk")  # the events a machine's JSON carries, newest first


class MachineSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    hypervisor = NameOrIdField(
        queryset=Hypervisor.objects.all(),
        required=False,
        allow_null=True,
        help_text="Id or name; leave out for any hypervisor with room.",
    )
    image = serializers.PrimaryKeyRelatedField(queryset=Image.objects.all(), required=False, allow_null=True)
    extra_isos = serializers.PrimaryKeyRelatedField(
        queryset=Image.objects.filter(kind="iso"), many=True, required=False, write_only=True
    )
    cdroms = serializers.SerializerMethodField()
    power_on = serializers.BooleanField(
        write_only=True,
        required=False,
        allow_null=True,
        default=None,
        help_text="Network-boot machines stay off unless true.",
    )
    bmc = serializers.SerializerMethodField()
    hostdev_match = serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        help_text="A regular expression: the first free matching host device.",
    )
    project = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Project.objects.all(),
        required=False,
        allow_null=True,
        help_text="Project name; you must be its admin.",
    )
    nics = NicSerializer(
        many=True,
        required=False,
        help_text="Left out: the tenant network (PORTAL_TENANT_NETWORK) where the hypervisor has it, "
        "else for users who are not staff the first network published to them, else none. "
        "Users who are not staff may use only the tenant network and published networks.",
    )
    lease_days = serializers.IntegerField(
        write_only=True,
        required=False,
        allow_null=True,
        default=None,
        min_value=0,
        max_value=3650,
        help_text="The lease in days: left out, the project's default; 0, none; at most the project's maximum "
        "(staff: any).",
    )
    override_capacity = serializers.BooleanField(
        write_only=True,
        required=False,
        default=False,
        help_text="Staff, with a named hypervisor: create it even where the "
        "host has no room (recorded in the audit trail).",
    )
    ssh_authorized_keys = StringOrList(required=False)
    packages = StringOrList(required=False)
    tags = serializers.ListField(
        child=serializers.CharField(max_length=32),
        required=False,
        max_length=20,
        help_text="Short labels (lower-case letters, digits, _ . -): `?tag=` filters the list, and each is a group "
        "`tag_<tag>` of the Ansible inventory.",
    )
    events = serializers.SerializerMethodField()
    guest_addresses = serializers.JSONField(
        source="last_observed.guest_addresses",
        read_only=True,
        help_text="MAC -> the addresses the running guest was last seen with.",
    )
    allowed_actions = serializers.SerializerMethodField(
        help_text="What you may do to the machine now (your role and its state), e.g. start, console, delete: "
        "what the portal's buttons offer, and what the actions here accept (machines/policy.py)."
    )

    class Meta:
        model = Machine
        fields = [
            "id",
            "uuid",
            "name",
            "owner",
            "hypervisor",
            "pool",
            "deploy_type",
            "image",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "max_vcpus",
            "max_memory_mib",
            "pending",
            "description",
            "tags",
            "nics",
            "ssh_authorized_keys",
            "packages",
            "script",
            "user_data",
            "deletion_protection",
            "autostart",
            "status",
            "status_message",
            "power_state",
            "operation",
            "domain_name",
            "adopted",
            "created",
            "events",
            "extra_isos",
            "cdroms",
            "power_on",
            "bmc",
            "project",
            "machine_type",
            "cpu_mode",
            "cpu_model",
            "cpu_topology",
            "smbios",
            "watchdog",
            "rng",
            "disk_bus",
            "disk_cache",
            "extra_disks",
            "qemu_args",
            "firmware",
            "secure_boot",
            "hostdevs",
            "hostdev_match",
            "guest_addresses",
            "override_capacity",
            "allowed_actions",
            "expires_at",
            "lease_days",
        ]
        read_only_fields = [
            "uuid",
            "status",
            "status_message",
            "power_state",
            "operation",
            "domain_name",
            "adopted",
            "pending",
            "created",
            "guest_addresses",
            "allowed_actions",
            "expires_at",
        ]
        validators: list[Any] = []  # the service validates (with the owner, which the request supplies)

    _events: EventSerializer | None = None
    _roles: dict[int, str] | None = None

    def get_bmc(self, machine) -> dict | None:
        """Where the BMC listens (the credentials: GET .../bmc/)."""
        if not machine.has_bmc:
            return None
        return {
            "address": machine.bmc_address,
            "port": machine.bmc_port,
            "username": machine.bmc_username,
            "listening": machine.bmc_listening,
        }

    def get_allowed_actions(self, machine) -> list[str]:
        request = self.context.get("request")
        if request is None:
            return []
        # The user's project roles are read once for the whole response (a list's every row asks them): a list
        # serializes every row with this one serializer.
        if self._roles is None:
            self._roles = access.project_roles(request.user)
        return sorted(policy.allowed_actions(request.user, machine, roles=self._roles))

    def get_cdroms(self, machine) -> list[dict]:
        return [{"slot": c.slot, "image": c.image_id} for c in machine.cdroms.all()]

    def get_events(self, machine) -> list[dict]:
        # Prefetched for the list and the detail (MachineViewSet.get_queryset); else asked here.
        events = getattr(machine, "recent_events", None)
        if events is None:
            events = machine.events.order_by(*RECENT_EVENTS_ORDER)[:RECENT_EVENTS]
        # One EventSerializer for every row of a list: building its fields costs more than the events.
        if self._events is None:
            self._events = EventSerializer(context=self.context)
        return [self._events.to_representation(event) for event in reversed(list(events))]

    def create(self, validated):
        # Left out: the default NIC (the tenant network where the hypervisor has it); [] means none.
        nics = [services.NicInput(**n) for n in validated.pop("nics")] if "nics" in validated else None
        validated.setdefault("hypervisor", None)
        try:
            return services.machine_create(owner=self.context["request"].user, nics=nics, **validated)
        except DjangoValidationError as e:
            raise serializers.ValidationError(
                e.message_dict if hasattr(e, "error_dict") else {"non_field_errors": e.messages}
            ) from None


# What the actions that queue work answer (MachineViewSet._act): the machine, or why not now.
QUEUED = {202: MachineSerializer, 409: DetailSerializer}


class SnapshotSerializer(serializers.ModelSerializer):
    """A snapshot of a machine (machines/services/snapshots.py): `kind` is the method the machine takes them by
    (internal for BIOS, external disk-only for UEFI); `parent` the snapshot it was taken after (its tree)."""

    # (a declared field, popped from the class by DRF: the serializer's own `parent` attribute is untouched)
    parent = serializers.CharField(  # type: ignore[assignment]
        source="parent.name", read_only=True, allow_null=True, default=None
    )
    created_by = serializers.CharField(source="created_by.username", read_only=True, allow_null=True, default=None)
    kept_disk = serializers.BooleanField(read_only=True, help_text="A rebuild's copy of the disk it replaced.")

    class Meta:
        model = MachineSnapshot
        fields = [
            "id",
            "name",
            "description",
            "kind",
            "memory",
            "quiesced",
            "automatic",
            "kept_disk",
            "status",
            "status_message",
            "size_bytes",
            "parent",
            "created",
            "created_by",
        ]
        read_only_fields = fields


class SnapshotCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, help_text="A host name: lower-case letters, digits and hyphens.")
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000, default="")
    memory = serializers.BooleanField(
        default=False, help_text="With the running machine's memory (BIOS machines; UEFI ones are disk-only)."
    )


class RebuildSerializer(serializers.Serializer):
    snapshot = serializers.BooleanField(
        default=True, help_text="Keep the old disk as an automatic snapshot first (counted in the disk quota)."
    )


SNAPSHOT_QUEUED = {202: SnapshotSerializer, 409: DetailSerializer}  # 400 and 404: portal/api_schema.py adds them


class CloneSerializer(serializers.Serializer):
    """A clone of a stopped machine (machines/services/clones.py): one by `name`, or `count` by `name_pattern`."""

    name = serializers.CharField(max_length=63, required=False, allow_blank=True, default="")
    count = serializers.IntegerField(min_value=1, max_value=20, default=1)
    name_pattern = serializers.CharField(
        max_length=60, required=False, allow_blank=True, default="", help_text="With {n}: web-{n} makes web-1, web-2..."
    )
    linked = serializers.BooleanField(
        default=True, help_text="Each disk's own layer over the same read-only image base; false: a full copy."
    )
    snapshot = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=1,
        help_text="A ready snapshot to clone from (copied whole): a kept disk, a disk-only or an internal one (the"
        " machine off).",
    )
    project = serializers.PrimaryKeyRelatedField(
        queryset=Project.objects.all(), required=False, allow_null=True, default=None
    )


class ClonesSerializer(serializers.Serializer):
    machines = MachineSerializer(many=True, read_only=True)


class SaveImageSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, help_text="The new catalogue image's name (unique).")
    os_name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")


class PowerSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=PowerAction.choices)


class MediaSerializer(serializers.Serializer):
    slot = serializers.IntegerField(min_value=0, max_value=3, default=0)
    image = serializers.PrimaryKeyRelatedField(queryset=Image.objects.filter(kind="iso"), allow_null=True)


class DiskAttachSerializer(serializers.Serializer):
    size_gib = serializers.IntegerField(min_value=1, max_value=16384, help_text="The new disk's size in GiB.")
    image = serializers.PrimaryKeyRelatedField(
        queryset=Image.objects.filter(kind="disk"),
        allow_null=True,
        required=False,
        default=None,
        help_text="A disk image the new disk is a copy-on-write overlay of; null: a blank disk.",
    )


class CdromAddSerializer(serializers.Serializer):
    image = serializers.PrimaryKeyRelatedField(
        queryset=Image.objects.filter(kind="iso"),
        allow_null=True,
        help_text="An ISO to put in the new drive; null: empty.",
    )


class GrowSerializer(serializers.Serializer):
    disk_gib = serializers.IntegerField(min_value=1, max_value=16384)


class MigrateSerializer(serializers.Serializer):
    hypervisor = NameOrIdField(
        queryset=Hypervisor.objects.all(), required=False, allow_null=True, help_text="Left out: placement picks."
    )
    live = serializers.BooleanField(
        default=False, help_text="A running machine moves while it runs (its disks' own data and memory copied)."
    )
    restart = serializers.BooleanField(
        default=False, help_text="A running machine: shut it down, move it, start it on the target."
    )


class ConsoleUrlSerializer(serializers.Serializer):
    url = serializers.URLField()
    expires_at = serializers.DateTimeField()


class BmcSerializer(serializers.Serializer):
    address = serializers.CharField()
    port = serializers.IntegerField()
    username = serializers.CharField()
    password = serializers.CharField()


class InstackNodeSerializer(serializers.Serializer):
    name = serializers.CharField()
    pm_type = serializers.CharField()
    pm_addr = serializers.CharField()
    pm_port = serializers.CharField()
    pm_user = serializers.CharField()
    pm_password = serializers.CharField()
    mac = serializers.ListField(child=serializers.CharField())
    cpu = serializers.CharField()
    memory = serializers.CharField()
    disk = serializers.CharField()
    arch = serializers.CharField()


class InstackenvSerializer(serializers.Serializer):
    nodes = InstackNodeSerializer(many=True)


class BootDeviceSerializer(serializers.Serializer):
    device = serializers.ChoiceField(choices=["pxe", "disk", "cdrom"])
    persistent = serializers.BooleanField(default=False)


class ProtectionSerializer(serializers.Serializer):
    deletion_protection = serializers.BooleanField()


class AutostartSerializer(serializers.Serializer):
    autostart = serializers.BooleanField()


class LeaseSerializer(serializers.Serializer):
    until = serializers.DateTimeField(
        allow_null=True,
        help_text="When the lease ends (null: none); at most the project's maximum from now (staff: any).",
    )


class MachineChangeSerializer(serializers.Serializer):
    """What PATCH /api/v1/machines/{id}/ may change (machines/services/changes.py); any other field is a 400."""

    vcpus = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=64,
        help_text="Live up to max_vcpus on a running machine; beyond it (or fewer), at its next cold start "
        "(`pending`).",
    )
    memory_mib = serializers.IntegerField(
        required=False,
        min_value=128,
        max_value=1 << 20,
        help_text="Live up to max_memory_mib on a running machine; beyond it (or less), at its next cold start.",
    )
    max_vcpus = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=64,
        help_text="The most vCPUs it can be given without a restart (null: none beyond vcpus); at least vcpus. "
        "Set at once while it is off, else at its next cold start (`pending`). Not charged to the quota.",
    )
    max_memory_mib = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=128,
        max_value=1 << 20,
        help_text="The most memory without a restart (null: none beyond memory_mib); as max_vcpus.",
    )
    name = serializers.CharField(
        required=False, max_length=63, help_text="A host name, unique among the owner's machines; the machine off."
    )
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000)
    tags = serializers.ListField(child=serializers.CharField(max_length=32), required=False, max_length=20)
    deletion_protection = serializers.BooleanField(required=False)
    autostart = serializers.BooleanField(required=False)

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {k: [f"Not changeable here; change one of {', '.join(self.fields)}."] for k in unknown}
                )
        return super().to_internal_value(data)


class MachineViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Machines you own (staff: all). Work happens in the background: poll `status` and `events`."""

    serializer_class = MachineSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema's generator: no user, only the model
            return Machine.objects.none()
        machines = machines_for(self.request.user)
        if self.action == "list" and "tag" in self.request.query_params:
            machines = services.machines_tagged(machines, self.request.query_params["tag"])
        if self.action not in ("list", "retrieve"):
            return machines  # the actions hand the machine to a service: whole, with its hypervisor
        recent = MachineEvent.objects.order_by(*RECENT_EVENTS_ORDER)[:RECENT_EVENTS]  # a window per machine
        # Each of these is one query for the whole page, whatever its size.
        return access.for_lists(machines).prefetch_related(
            "nics", "cdroms", Prefetch("events", queryset=recent, to_attr="recent_events")
        )

    def _machine(self, action: str) -> Machine:
        """The machine (404 if not visible), checked for the role the action needs (403; machines.policy)."""
        machine = self.get_object()
        policy.require(self.request.user, machine, action)
        return machine

    def _data(self, machine: Machine) -> dict:
        """The machine as it is now, with what the requesting user may do to it now."""
        return self.get_serializer(Machine.objects.get(pk=machine.pk)).data

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "keep_disks",
                bool,
                description="An adopted machine's disks stay on the hypervisor (its default: true); "
                "only adopted machines may keep them.",
            )
        ],
        responses={202: DetailSerializer, 400: DetailSerializer, 409: DetailSerializer},
    )
    def destroy(self, request, *args, **kwargs):
        machine = self.get_object()
        keep = request.query_params.get("keep_disks")
        if keep is not None and keep.lower() not in ("true", "false", "1", "0"):
            return Response({"detail": "keep_disks is true or false."}, status=status.HTTP_400_BAD_REQUEST)
        keep_disks = None if keep is None else keep.lower() in ("true", "1")
        try:
            services.machine_delete(machine=machine, actor=request.user, keep_disks=keep_disks)
        except services.MachineError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        return Response({"detail": "deleting"}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[
            OpenApiParameter("tag", str, description="Only machines with this tag (machines/services/changes.py).")
        ]
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(
        request=MachineChangeSerializer,
        responses={200: MachineSerializer, 409: DetailSerializer},
        description="Change vCPUs, memory, their maxima, name, description, tags, deletion protection or autostart. "
        "Hypervisor work is queued (`operation` is `change` until it is done); what the running machine cannot "
        "take now is listed in `pending` until its next cold start.",
    )
    def partial_update(self, request, *args, **kwargs):
        machine = self.get_object()
        s = MachineChangeSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            services.machine_change(machine=machine, actor=request.user, **s.validated_data)
        except services.MachineError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        except DjangoValidationError as e:
            return Response(e.message_dict if hasattr(e, "error_dict") else {"detail": e.messages}, status=400)
        return Response(self._data(machine))

    def _act(self, fn, **kwargs) -> Response:
        """Call the service for an action on the machine (404 if not visible). It decides by machines.policy:
        the user's role refused answers 403, the machine's state 409."""
        machine = self.get_object()
        try:
            fn(machine=machine, actor=self.request.user, **kwargs)
        except services.MachineError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        except DjangoValidationError as e:
            return Response(e.message_dict if hasattr(e, "error_dict") else {"detail": e.messages}, status=400)
        return Response(self._data(machine), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=PowerSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"])
    def power(self, request, pk=None):
        s = PowerSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        action = s.validated_data["action"]
        return self._act(services.machine_power, action=action)

    @extend_schema(request=MediaSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"])
    def media(self, request, pk=None):
        """Insert an ISO (`image`) into CD-ROM `slot`, or eject it (`image` null)."""
        s = MediaSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._act(services.machine_change_media, slot=s.validated_data["slot"], image=s.validated_data["image"])

    @extend_schema(request=None, responses=QUEUED)
    @action(detail=True, methods=["post"], url_path="boot-cdrom")
    def boot_cdrom(self, request, pk=None):
        """Cold-start once from the installer CD-ROM."""
        return self._act(services.machine_boot_cdrom_once)

    @extend_schema(request=RebuildSerializer, responses=QUEUED)
    @action(
        detail=True, methods=["post"], serializer_class=MachineSerializer
    )  # the answer; the body: RebuildSerializer
    def rebuild(self, request, pk=None):
        """Recreate the disk from the image; the old disk is kept as a snapshot first unless `snapshot` is false."""
        s = RebuildSerializer(data=request.data if request.data else {})
        s.is_valid(raise_exception=True)
        return self._act(services.machine_rebuild, snapshot=s.validated_data["snapshot"])

    # --- snapshots -----------------------------------------------------------------------------------------

    def _snapshot_call(self, fn, **kwargs) -> Response:
        try:
            snap = fn(**kwargs)
        except services.MachineError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        except DjangoValidationError as e:
            return Response(e.message_dict if hasattr(e, "error_dict") else {"detail": e.messages}, status=400)
        snap = snap or kwargs["snapshot"]
        # As it is now; a worker may have finished (a deleted one is gone): then as the request left it.
        now = MachineSnapshot.objects.select_related("parent", "created_by").filter(pk=snap.pk).first()
        return Response(SnapshotSerializer(now or snap).data, status=status.HTTP_202_ACCEPTED)

    def _snapshot_of(self, machine: Machine, sid: str) -> MachineSnapshot:
        snap = machine.snapshots.filter(pk=int(sid)).first() if sid.isdigit() and len(sid) <= 18 else None
        if snap is None:
            raise NotFound("No such snapshot of this machine.")
        return snap

    @extend_schema(methods=["GET"], responses={200: SnapshotSerializer(many=True)})
    @extend_schema(methods=["POST"], request=SnapshotCreateSerializer, responses=SNAPSHOT_QUEUED)
    @action(detail=True, methods=["get", "post"], serializer_class=SnapshotCreateSerializer, pagination_class=None)
    def snapshots(self, request, pk=None):
        """The machine's snapshots, parents first (GET); take one (POST): queued, its `status` creating, then
        ready or error. Operators take them; admins revert and delete (`allowed_actions`)."""
        machine = self.get_object()
        if request.method == "GET":
            snaps = machine.snapshots.select_related("parent", "created_by")
            return Response(SnapshotSerializer(snaps, many=True).data)
        s = SnapshotCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._snapshot_call(services.snapshot_create, machine=machine, actor=request.user, **s.validated_data)

    @extend_schema(request=None, responses=SNAPSHOT_QUEUED)
    @action(
        detail=True,
        methods=["post"],
        url_path=r"snapshots/(?P<sid>[^/.]+)/revert",
        url_name="snapshot-revert",
        serializer_class=SnapshotSerializer,
    )
    def snapshot_revert(self, request, pk=None, sid=""):
        """Revert the machine to the snapshot: a memory snapshot brings it back running, a disk-only one off."""
        machine = self.get_object()
        snap = self._snapshot_of(machine, sid)
        return self._snapshot_call(services.snapshot_revert, machine=machine, snapshot=snap, actor=request.user)

    @extend_schema(request=None, responses=SNAPSHOT_QUEUED)
    @action(
        detail=True,
        methods=["delete"],
        url_path=r"snapshots/(?P<sid>[^/.]+)",
        url_name="snapshot-detail",
        serializer_class=SnapshotSerializer,
    )
    def snapshot_delete(self, request, pk=None, sid=""):
        """Delete the snapshot (an external one's overlays are merged back); its children take its parent."""
        machine = self.get_object()
        snap = self._snapshot_of(machine, sid)
        return self._snapshot_call(services.snapshot_delete, machine=machine, snapshot=snap, actor=request.user)

    # --- clones and images from machines ------------------------------------------------------------------

    def _refused(self, e: Exception) -> Response:
        if isinstance(e, services.MachineError):
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        assert isinstance(e, DjangoValidationError)
        return Response(e.message_dict if hasattr(e, "error_dict") else {"detail": e.messages}, status=400)

    @extend_schema(request=CloneSerializer, responses={202: ClonesSerializer, 409: DetailSerializer})
    @action(detail=True, methods=["post"], serializer_class=ClonesSerializer)
    def clone(self, request, pk=None):
        """Clone the stopped machine into new machines of yours on its hypervisor (quota-checked at once): each
        `provisioning` until its disks are copied and it boots with its own MACs and cloud-init instance-id."""
        machine = self.get_object()
        s = CloneSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        data = s.validated_data
        snap = None
        if data["snapshot"] is not None:
            snap = machine.snapshots.filter(pk=data["snapshot"]).first() if data["snapshot"] < 1 << 62 else None
            if snap is None:
                raise NotFound("No such snapshot of this machine.")
        try:
            made = services.machine_clone(
                machine=machine,
                actor=request.user,
                name=data["name"],
                count=data["count"],
                name_pattern=data["name_pattern"] or None,
                linked=data["linked"],
                snapshot=snap,
                project=data["project"],
            )
        except (services.MachineError, DjangoValidationError) as e:
            return self._refused(e)
        now = [Machine.objects.get(pk=m.pk) for m in made]
        answer = {"machines": MachineSerializer(now, many=True, context=self.get_serializer_context()).data}
        return Response(answer, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=SaveImageSerializer, responses={202: ImageSerializer, 409: DetailSerializer})
    @action(detail=True, methods=["post"], url_path="save-image", serializer_class=ImageSerializer)
    def save_image(self, request, pk=None):
        """Save the stopped machine's disk as a new catalogue image of yours (flattened, checked like an upload):
        `importing`, then `ready` or `error`."""
        machine = self.get_object()
        s = SaveImageSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            image = services.image_from_machine(machine=machine, actor=request.user, **s.validated_data)
        except (services.MachineError, DjangoValidationError) as e:
            return self._refused(e)
        image.refresh_from_db()
        return Response(ImageSerializer(image, context=self.get_serializer_context()).data, status=202)

    # --- disks, NICs and CD-ROM drives after create (machines.services.devices) ----------------------------

    def _numbered(self, value: str, what: str) -> int:
        if not value.isdigit() or len(value) > 6:
            raise NotFound(f"No such {what} of this machine (they are numbered from 1).")
        return int(value)

    @extend_schema(request=DiskAttachSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"], serializer_class=MachineSerializer)  # the answer; the body: request=
    def disks(self, request, pk=None):
        """Attach a disk: blank, or over a disk `image`; counted in the disk quota. Hot-plugged into a running
        machine on a virtio or scsi bus; on a sata or ide bus the machine must be off. `extra_disks` lists it."""
        s = DiskAttachSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._act(services.machine_attach_disk, **s.validated_data)

    @extend_schema(
        request=None,
        responses=QUEUED,
        parameters=[
            OpenApiParameter("keep_volume", bool, description="Keep the disk's volume in the pool (default: delete).")
        ],
    )
    @action(
        detail=True,
        methods=["delete"],
        url_path=r"disks/(?P<n>[^/.]+)",
        url_name="disk-detail",
        serializer_class=MachineSerializer,
    )
    def disk_detach(self, request, pk=None, n=""):
        """Detach extra disk `n` (1: the first of `extra_disks`) and delete its volume unless `keep_volume`."""
        keep = request.query_params.get("keep_volume", "false").lower()
        if keep not in ("true", "false", "1", "0"):
            return Response({"detail": "keep_volume is true or false."}, status=status.HTTP_400_BAD_REQUEST)
        disk = self._numbered(n, "disk")
        return self._act(services.machine_detach_disk, disk=disk, keep_volume=keep in ("true", "1"))

    @extend_schema(request=NicSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"], serializer_class=MachineSerializer)  # the answer; the body: request=
    def nics(self, request, pk=None):
        """Attach a NIC, on a network you could give a new machine there (the same policy); MAC generated when
        empty. Hot-plugged into a running machine; an image machine's seed gets the new network-config."""
        s = NicSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._act(services.machine_attach_nic, nic=services.NicInput(**s.validated_data))

    @extend_schema(request=None, responses=QUEUED)
    @action(
        detail=True,
        methods=["delete"],
        url_path=r"nics/(?P<n>[^/.]+)",
        url_name="nic-detail",
        serializer_class=MachineSerializer,
    )
    def nic_detach(self, request, pk=None, n=""):
        """Detach NIC `n` (1: the first of `nics`)."""
        return self._act(services.machine_detach_nic, nic=self._numbered(n, "NIC"))

    @extend_schema(request=CdromAddSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"], serializer_class=MachineSerializer)  # the answer; the body: request=
    def cdroms(self, request, pk=None):
        """Add a CD-ROM drive (empty, or with an ISO) to a machine of any kind, while it is off; then change its
        media with POST media/."""
        s = CdromAddSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._act(services.machine_add_cdrom, **s.validated_data)

    @extend_schema(request=None, responses=QUEUED)
    @action(
        detail=True,
        methods=["delete"],
        url_path=r"cdroms/(?P<slot>[^/.]+)",
        url_name="cdrom-detail",
        serializer_class=MachineSerializer,
    )
    def cdrom_remove(self, request, pk=None, slot=""):
        """Remove the CD-ROM drive in `slot` (the last one; an ISO machine keeps slot 0), while the machine is off."""
        if not slot.isdigit() or len(slot) > 2:
            raise NotFound("No such CD-ROM drive of this machine (slots are numbered from 0).")
        return self._act(services.machine_remove_cdrom, slot=int(slot))

    @extend_schema(request=GrowSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"], url_path="grow-disk")
    def grow_disk(self, request, pk=None):
        s = GrowSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._act(services.machine_grow_disk, disk_gib=s.validated_data["disk_gib"])

    @extend_schema(request=MigrateSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"])
    def migrate(self, request, pk=None):
        """Move the stopped machine to another hypervisor (by id or name; left out: placement picks), cold:
        its disks are copied, it is defined there, then removed here. Progress in `events`."""
        s = MigrateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._act(
            services.machine_migrate,
            hypervisor=s.validated_data.get("hypervisor"),
            live=s.validated_data["live"],
            restart=s.validated_data["restart"],
        )

    @extend_schema(request=None, responses=QUEUED)
    @action(detail=True, methods=["post"], url_path="migrate/cancel")
    def migrate_cancel(self, request, pk=None):
        """Call off a live move under way: the machine runs on where it was."""
        return self._act(services.machine_migrate_cancel)

    @extend_schema(request=None, responses={200: ConsoleUrlSerializer})
    @action(detail=True, methods=["post"])
    def console(self, request, pk=None):
        """A one-time URL that opens the console in a browser with no portal session (like
        `openstack console url show`). The credential is in the URL's fragment; it works once and
        expires unused within PORTAL_CONSOLE_TOKEN_TTL seconds (the fragment's `r`, the reconnect secret,
        lets the page that opened it reconnect within PORTAL_CONSOLE_RECONNECT_GRACE seconds)."""
        machine = self._machine("console")
        raw, expires = consoles.console_token_issue(machine=machine, user=request.user)
        fragment = f"#m={machine.pk}&t={raw}&r={consoles.console_reconnect_secret(raw)}"
        url = request.build_absolute_uri(reverse("console-standalone")) + fragment
        response = Response({"url": url, "expires_at": expires})
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(request=None, responses={200: BmcSerializer})
    @action(detail=True, methods=["get"])
    def bmc(self, request, pk=None):
        """The BMC's address, port and credentials. Every call is recorded in the machine's events."""
        machine = self.get_object()
        try:
            data = services.machine_bmc_reveal(machine=machine, actor=request.user)
        except services.MachineError as e:
            return Response({"detail": str(e)}, status=status.HTTP_404_NOT_FOUND)
        response = Response(data)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(request=BootDeviceSerializer, responses=QUEUED)
    @action(detail=True, methods=["post"], url_path="boot-device")
    def boot_device(self, request, pk=None):
        """Through the BMC: `pxe`, `disk` or `cdrom`, once or persistent; takes effect at the next cold start."""
        s = BootDeviceSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return self._act(services.machine_set_boot_device, **s.validated_data)

    @extend_schema(
        request=None,
        parameters=[OpenApiParameter("ids", str, description="comma-separated machine ids")],
        responses={200: InstackenvSerializer},
    )
    @action(detail=False, methods=["get"])
    def instackenv(self, request):
        """Ironic / TripleO instackenv.json of your network-boot machines (or of `ids`). Holds BMC passwords:
        every machine exported is recorded in its events."""
        machines = self.get_queryset().filter(bmc_port__isnull=False)
        ids = request.query_params.get("ids")
        if ids:
            try:
                machines = machines.filter(pk__in=[int(i) for i in ids.split(",") if i.strip()])
            except ValueError:
                return Response({"ids": "Give machine ids separated by commas."}, status=400)
        roles, need = access.project_roles(request.user), policy.need("reveal_bmc")
        machines = [m for m in machines if access.can(request.user, m, need, roles)]  # BMC passwords
        response = Response(services.instackenv(machines, user=request.user))
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(request=ProtectionSerializer)
    @action(detail=True, methods=["post"])
    def protection(self, request, pk=None):
        s = ProtectionSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        machine = self.get_object()
        services.machine_set_protection(
            machine=machine, protected=s.validated_data["deletion_protection"], actor=request.user
        )
        return Response(self._data(machine))

    @extend_schema(request=LeaseSerializer, responses={200: MachineSerializer})
    @action(detail=True, methods=["post"], serializer_class=LeaseSerializer)
    def lease(self, request, pk=None):
        """Set or extend the machine's lease (machines/leases.py); a refusal says the project's maximum."""
        s = LeaseSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        machine = self.get_object()
        try:
            services.machine_extend_lease(machine=machine, actor=request.user, until=s.validated_data["until"])
        except leases.LeaseRefused as e:
            raise serializers.ValidationError({"until": [str(e)]}) from None
        return Response(
            MachineSerializer(Machine.objects.get(pk=machine.pk), context=self.get_serializer_context()).data
        )

    @extend_schema(request=AutostartSerializer)
    @action(detail=True, methods=["post"])
    def autostart(self, request, pk=None):
        """Whether the hypervisor starts the machine when it boots (set in libvirt by the worker)."""
        s = AutostartSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        machine = self.get_object()
        services.machine_set_autostart(machine=machine, enabled=s.validated_data["autostart"], actor=request.user)
        return Response(self._data(machine))


class MaintenanceSerializer(serializers.Serializer):
    maintenance = serializers.BooleanField(help_text="True: drained (nothing new lands there); false: in service.")


class EvacuateSerializer(serializers.Serializer):
    restart = serializers.BooleanField(
        default=False, help_text="Also running machines: shut each down, move it, start it on its target."
    )


class OrphansRemoveSerializer(serializers.Serializer):
    keys = serializers.ListField(
        child=serializers.CharField(max_length=600),
        required=False,
        help_text="Keys of reported leftovers (the hypervisor's `orphans`); left out: all that are reported.",
    )


class AdoptSerializer(serializers.Serializer):
    domain_uuid = serializers.UUIDField(help_text="A domain among the hypervisor's `unmanaged_domains`.")
    owner = serializers.SlugRelatedField(
        slug_field="username", queryset=get_user_model().objects.all(), help_text="User name of the owner."
    )
    project = serializers.PrimaryKeyRelatedField(queryset=Project.objects.all(), required=False, allow_null=True)
    name = serializers.CharField(
        max_length=63, required=False, allow_blank=True, help_text="The machine's name; empty: the domain's."
    )
    bmc = serializers.BooleanField(default=False, help_text="Give it a virtual BMC.")

    def to_internal_value(self, data):
        # the owner by user name or by id
        if isinstance(data, dict) and str(data.get("owner", "")).isdigit():
            user = get_user_model().objects.filter(pk=int(data["owner"])).first()
            data = {**data, "owner": user.get_username() if user else data["owner"]}
        return super().to_internal_value(data)


class OrphansQueuedSerializer(serializers.Serializer):
    queued = serializers.ListField(child=serializers.CharField(), help_text="Keys whose removal was queued.")


class EvacuationSerializer(serializers.Serializer):
    hypervisor = HypervisorSerializer()
    machines = serializers.ListField(child=serializers.CharField(), help_text="What happens to each machine.")


class HypervisorMaintenanceViewSet(viewsets.GenericViewSet):
    """A hypervisor's maintenance (staff): drain it, return it to service, evacuate it (machines/services/migration.py)."""

    queryset = Hypervisor.objects.all()
    permission_classes = [permissions.IsAdminUser]

    # Each action names what it reads: DRF's OPTIONS answer describes it (with none it failed with a 500).
    @extend_schema(request=MaintenanceSerializer, responses={200: HypervisorSerializer})
    @action(detail=True, methods=["post"], serializer_class=MaintenanceSerializer)
    def maintenance(self, request, pk=None):
        s = MaintenanceSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        hv = services.hypervisor_set_maintenance(
            hypervisor=self.get_object(), enabled=s.validated_data["maintenance"], actor=request.user
        )
        return Response(HypervisorSerializer(hv).data)

    @extend_schema(request=EvacuateSerializer, responses={202: EvacuationSerializer})
    @action(detail=True, methods=["post"], serializer_class=EvacuateSerializer)
    def evacuate(self, request, pk=None):
        """Drain the hypervisor and queue a move for each of its machines (placement picks each target);
        `machines` says what happens to each. Progress in each machine's events."""
        s = EvacuateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        hv = self.get_object()
        report = services.hypervisor_evacuate(hypervisor=hv, actor=request.user, restart=s.validated_data["restart"])
        hv.refresh_from_db()
        return Response({"hypervisor": HypervisorSerializer(hv).data, "machines": report}, status=202)

    @extend_schema(request=AdoptSerializer, responses={202: MachineSerializer, 409: DetailSerializer})
    @action(detail=True, methods=["post"], serializer_class=AdoptSerializer)
    def adopt(self, request, pk=None):
        """Adopt a domain the portal does not manage (machines/services/adoption.py): recorded as a machine of
        `owner`, charged to their quotas; the worker takes it over (the machine's events say what it found)."""
        s = AdoptSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        data = s.validated_data
        try:
            machine = services.machine_adopt(
                hypervisor=self.get_object(),
                domain_uuid=str(data["domain_uuid"]),
                owner=data["owner"],
                project=data.get("project"),
                actor=request.user,
                name=data.get("name") or None,
                bmc=data["bmc"],
            )
        except services.MachineError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        machine = Machine.objects.get(pk=machine.pk)
        return Response(MachineSerializer(machine, context={"request": request}).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=OrphansRemoveSerializer, responses={202: OrphansQueuedSerializer, 409: DetailSerializer})
    @action(
        detail=True,
        methods=["post"],
        url_path="orphans/remove",
        url_name="orphans-remove",
        serializer_class=OrphansRemoveSerializer,
    )
    def orphans_remove(self, request, pk=None):
        """Remove domains and volumes the portal left here that no machine owns (machines/services/sweeper.py):
        those named, or all that are reported; the worker checks each again before it acts."""
        s = OrphansRemoveSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        try:
            queued = services.hypervisor_orphans_remove(
                hypervisor=self.get_object(), actor=request.user, keys=s.validated_data.get("keys")
            )
        except services.MachineError as e:
            return Response({"detail": str(e)}, status=status.HTTP_409_CONFLICT)
        return Response({"queued": queued}, status=status.HTTP_202_ACCEPTED)

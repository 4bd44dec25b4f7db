from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view, inline_serializer
from rest_framework import permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from hypervisors import services
from hypervisors.models import Hypervisor, Image
from hypervisors.uploads import allow_large_upload
from portal import api_schema


class HypervisorSerializer(serializers.ModelSerializer):
    domain_type = serializers.CharField(read_only=True, help_text="The type machines get: the override, else detected.")
    qemu_version = serializers.CharField(source="hypervisor_version", read_only=True)
    orphans = serializers.JSONField(
        read_only=True,
        help_text="Staff only (empty for others): domains and volumes the portal left here that no machine owns, "
        "as the sweeper last saw them; `reported` ones may be removed (POST .../orphans/remove/).",
    )

    class Meta:
        model = Hypervisor
        fields = [
            "id",
            "name",
            "uri",
            "console_address",
            "domain_type_override",
            "cpu_allocation_ratio",
            "enabled",
            "maintenance",
            "status",
            "status_error",
            "last_seen",
            "last_checked",
            "hostname",
            "arch",
            "cpu_model",
            "cpus",
            "memory_mib",
            "libvirt_version",
            "qemu_version",
            "domain_type",
            "detected_domain_type",
            "domain_types",
            "guest_arches",
            "pools",
            "networks",
            "unmanaged_domains",
            "managed_domain_count",
            "orphans",
            "orphans_swept",
            "created",
            "updated",
        ]
        read_only_fields = [f for f in fields if f not in services.EDITABLE_FIELDS]

    def to_representation(self, instance):
        data = super().to_representation(instance)
        request = self.context.get("request")
        if not getattr(getattr(request, "user", None), "is_staff", False):
            data["orphans"] = []  # what lies on a host is for staff
        return data

    def create(self, validated_data):
        return _from_django_errors(lambda: services.hypervisor_create(**validated_data))

    def update(self, instance, validated_data):
        return _from_django_errors(lambda: services.hypervisor_update(hypervisor=instance, **validated_data))


def _from_django_errors(fn):
    try:
        return fn()
    except DjangoValidationError as e:
        raise serializers.ValidationError(e.message_dict if hasattr(e, "error_dict") else e.messages) from None


class NetworkSerializer(serializers.Serializer):
    name = serializers.CharField(
        max_length=50,
        required=False,
        allow_blank=True,
        default="",
        help_text="Not for mode tenant, which is named by PORTAL_TENANT_NETWORK.",
    )
    mode = serializers.ChoiceField(choices=["tenant", "nat", "isolated", "bridge", "macvtap"])
    bridge = serializers.CharField(required=False, allow_blank=True, default="")
    interface = serializers.CharField(required=False, allow_blank=True, default="")
    cidr = serializers.CharField(required=False, allow_blank=True, default="")
    dhcp_start = serializers.CharField(required=False, allow_blank=True, default="")
    dhcp_end = serializers.CharField(required=False, allow_blank=True, default="")
    tftp_root = serializers.CharField(required=False, allow_blank=True, default="")
    boot_file = serializers.CharField(required=False, allow_blank=True, default="")
    ipv6_cidr = serializers.CharField(required=False, allow_blank=True, default="")


class DetailSerializer(serializers.Serializer):
    detail = serializers.CharField()


QUEUED = OpenApiResponse(DetailSerializer, description="Queued.")
# A delete refused (still in use) answers 400 with the reason, as DRF's validation errors are written; it takes
# no input, so the schema's generic 400 (portal/api_schema.py) does not cover it.
IN_USE = OpenApiResponse(api_schema.COMPONENTS[api_schema.VALIDATION], description="Still in use: nothing was deleted.")


class StaffWritePermission(permissions.BasePermission):
    """Everyone logged in may read; only staff change hypervisors."""

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in permissions.SAFE_METHODS or request.user.is_staff


@extend_schema_view(destroy=extend_schema(responses={204: None, 400: IN_USE}))
class HypervisorViewSet(viewsets.ModelViewSet):
    """Libvirt hosts. Changes are checked against the host in the background: poll `status`."""

    queryset = Hypervisor.objects.all()
    serializer_class = HypervisorSerializer
    permission_classes = [StaffWritePermission]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        hypervisors = super().get_queryset()
        if self.action != "list":
            return hypervisors  # a change or a sync needs the row whole
        # Capabilities the serializer does not show (kilobytes of JSON per host) stay in the database.
        return hypervisors.defer("machine_types", "cpu_modes", "cpu_models", "firmwares", "interfaces", "devices")

    def perform_destroy(self, instance):
        try:
            services.hypervisor_delete(hypervisor=instance)
        except services.HypervisorInUse as e:
            raise serializers.ValidationError({"detail": str(e)}) from None

    @extend_schema(request=NetworkSerializer, responses={202: QUEUED})
    @action(detail=True, methods=["post"], url_path="networks")
    def networks(self, request, pk=None):
        """Define a libvirt network on the hypervisor (staff): the tenant network (isolated from the
        hypervisor by the portal's traffic filter, for everyone), NAT, isolated, host bridge or macvtap,
        with DHCP and, for network boot, a TFTP root and boot file."""
        from hypervisors import networks

        hv = self.get_object()
        s = NetworkSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        _from_django_errors(lambda: networks.network_create(hypervisor=hv, spec=networks.spec_from(s.validated_data)))
        return Response({"detail": "network queued"}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: QUEUED, 400: IN_USE})
    @action(detail=True, methods=["delete"], url_path=r"networks/(?P<name>[^/]+)")
    def network_delete(self, request, pk=None, name=None):
        from hypervisors import networks

        hv = self.get_object()
        _from_django_errors(lambda: networks.network_delete(hypervisor=hv, name=name))
        return Response({"detail": "network removal queued"}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=None,
        responses={
            202: OpenApiResponse(
                inline_serializer(
                    "SyncQueued",
                    {
                        "id": serializers.IntegerField(),
                        "status": serializers.CharField(),
                        "detail": serializers.CharField(),
                    },
                ),
                description="A check was queued.",
            )
        },
    )
    @action(detail=True, methods=["post"])
    def sync(self, request, pk=None):
        hv = self.get_object()
        services.hypervisor_request_sync(hypervisor=hv)
        return Response({"id": hv.pk, "status": hv.status, "detail": "sync queued"}, status=status.HTTP_202_ACCEPTED)


class ImageSerializer(serializers.ModelSerializer):
    file = serializers.FileField(write_only=True, required=False, help_text="The image, as a multipart upload.")
    format = serializers.ChoiceField(choices=["qcow2", "raw", "iso"], required=False, default="qcow2")
    progress_percent = serializers.IntegerField(read_only=True, allow_null=True)

    class Meta:
        model = Image
        fields = [
            "id",
            "name",
            "kind",
            "format",
            "os_name",
            "default_user",
            "arch",
            "status",
            "status_message",
            "source_url",
            "expected_sha256",
            "file",
            "file_size_bytes",
            "virtual_size_bytes",
            "sha256",
            "progress_bytes",
            "total_bytes",
            "progress_percent",
            "created",
        ]
        read_only_fields = [
            "status",
            "status_message",
            "file_size_bytes",
            "virtual_size_bytes",
            "sha256",
            "progress_bytes",
            "total_bytes",
            "created",
        ]

    def validate(self, data):
        if bool(data.get("file")) == bool(data.get("source_url")):
            raise serializers.ValidationError("Give either a multipart `file` or a `source_url`.")
        return data

    def create(self, validated):
        from hypervisors import images

        common = {
            "name": validated["name"],
            "kind": validated.get("kind", "disk"),
            "fmt": validated.get("format", "qcow2"),
            "owner": self.context["request"].user,
            "os_name": validated.get("os_name", ""),
            "default_user": validated.get("default_user", "debian"),
            "arch": validated.get("arch", "x86_64"),
        }
        if validated.get("file"):
            return _from_django_errors(lambda: images.image_create_from_upload(uploaded=validated["file"], **common))
        return _from_django_errors(
            lambda: images.image_create_from_url(
                source_url=validated["source_url"], expected_sha256=validated.get("expected_sha256", ""), **common
            )
        )


@extend_schema_view(destroy=extend_schema(responses={204: None, 400: IN_USE}))
class ImageViewSet(viewsets.ModelViewSet):
    """The image catalogue. New images are checked in the background: poll `status`."""

    queryset = Image.objects.all()
    serializer_class = ImageSerializer
    permission_classes = [StaffWritePermission]
    http_method_names = ["get", "post", "delete", "head", "options"]

    def initial(self, request, *args, **kwargs):
        # Only a create by staff may spool a large file to disk (hypervisors/uploads.py). A session's CSRF check
        # reads the body while authenticating, so a staff session switches the handlers first; a token is
        # known only once DRF has authenticated it, and then nothing has read the body yet.
        creating = self.action == "create"
        if creating and getattr(getattr(request._request, "user", None), "is_staff", False):
            allow_large_upload(request._request)
        super().initial(request, *args, **kwargs)
        if creating and request.user.is_staff:
            allow_large_upload(request._request)

    def perform_destroy(self, instance):
        from hypervisors import images

        try:
            images.image_delete(image=instance)
        except images.ImageInUse as e:
            raise serializers.ValidationError({"detail": str(e)}) from None

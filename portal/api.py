from rest_framework import permissions, serializers, viewsets

from portal.models import AuditEvent


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created",
            "username",
            "address",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "outcome",
            "detail",
        ]


class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    """Staff: the audit trail, newest first. Filter with ?user=, ?action= (prefix), ?object_type=, ?outcome=."""

    serializer_class = AuditEventSerializer
    permission_classes = [permissions.IsAdminUser]

    def get_queryset(self):
        qs = AuditEvent.objects.all()
        params = self.request.query_params
        if params.get("user"):
            qs = qs.filter(username=params["user"])
        if params.get("action"):
            qs = qs.filter(action__startswith=params["action"])
        if params.get("object_type"):
            qs = qs.filter(object_type=params["object_type"])
        if params.get("outcome"):
            qs = qs.filter(outcome=params["outcome"])
        return qs

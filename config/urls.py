from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.routers import DefaultRouter

from config import views
from hypervisors.api import HypervisorViewSet, ImageViewSet
from labs import inventory_views
from labs.api import LabTemplateViewSet, LabViewSet
from labs.api_inventory import InventoryView
from labs.schedule_api import LabScheduleViewSet, MachineScheduleViewSet
from machines import views as machine_views
from machines.api import HypervisorMaintenanceViewSet, MachineViewSet
from metrics import exporter
from metrics.api import HypervisorMetricsView, MachineMetricsView
from metrics.usage_api import UsageView
from portal import account
from portal.api import AuditEventViewSet
from portal.throttle import ThrottledAuthenticationForm
from workflows.api import WorkflowRunViewSet, WorkflowViewSet

router = DefaultRouter()
router.register("hypervisors", HypervisorViewSet, basename="hypervisor")
router.register("hypervisors", HypervisorMaintenanceViewSet, basename="hypervisor-moves")  # machines' side of a host
router.register("images", ImageViewSet, basename="image")
router.register("machines", MachineViewSet, basename="machine")
router.register("audit", AuditEventViewSet, basename="audit")
router.register("labs", LabViewSet, basename="lab")
router.register("lab-templates", LabTemplateViewSet, basename="lab-template")
router.register(r"machines/(?P<id>[0-9]+)/schedules", MachineScheduleViewSet, basename="machine-schedule")
router.register(r"labs/(?P<id>[0-9]+)/schedules", LabScheduleViewSet, basename="lab-schedule")
router.register("workflows", WorkflowViewSet, basename="workflow")
router.register("workflow-runs", WorkflowRunViewSet, basename="workflow-run")

handler400 = views.bad_request  # JSON under /api/ (too many fields, a malformed body), Django's page elsewhere

urlpatterns = [
    path("", views.home, name="home"),
    path(
        "login/",
        auth_views.LoginView.as_view(
            authentication_form=ThrottledAuthenticationForm,
            redirect_authenticated_user=True,
            extra_context={"self_registration": settings.PORTAL_SELF_REGISTRATION},
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("hypervisors/", include("hypervisors.urls")),
    path("machines/", include("machines.urls")),
    path("labs/inventory.yaml", inventory_views.inventory_yaml, name="inventory-yaml"),
    path("labs/<int:pk>/inventory.yaml", inventory_views.lab_inventory_yaml, name="inventory-yaml-lab"),
    path("labs/", include("labs.urls")),
    path("workflows/", include("workflows.urls")),
    path("metrics-data/", include("metrics.urls")),  # the graphs' JSON for the pages (/metrics is Prometheus')
    path("console/", machine_views.console_standalone, name="console-standalone"),
    path("admin/", admin.site.urls),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/v1/inventory/", InventoryView.as_view(), name="api-inventory"),
    path("api/v1/usage/", UsageView.as_view(), name="api-usage"),
    # Ahead of the router: metrics sits above machines and hypervisors, whose viewsets know nothing of it.
    path("api/v1/machines/<int:id>/metrics/", MachineMetricsView.as_view(), name="machine-metrics"),
    path("api/v1/hypervisors/<int:id>/metrics/", HypervisorMetricsView.as_view(), name="hypervisor-metrics"),
    path("api/v1/", include(router.urls)),
    re_path(r"^api/", views.api_not_found),  # any other /api/ path: JSON, as the API's own 404s are
    path("healthz", views.healthz, name="healthz"),
    path("metrics", exporter.metrics, name="metrics"),  # Prometheus (token, address allow-list or staff)
    path("usage/", include("metrics.usage_urls")),
    path("audit/", views.audit_list, name="audit"),
    path("audit/export.csv", views.audit_export_csv, name="audit_export_csv"),
    path("audit/export.json", views.audit_export_json, name="audit_export_json"),
    path("imports/", include("labs.import_views")),  # AnsiStack inventory imports (staff)
    path("account/", account.account, name="account"),
    path("signup/", account.signup, name="signup"),
    path(
        "account/password/",
        auth_views.PasswordChangeView.as_view(success_url="/account/password/done/"),
        name="password_change",
    ),
    path("account/password/done/", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
    path("account/tokens/", account.token_create, name="account-token-create"),
    path("account/tokens/<int:pk>/revoke/", account.token_revoke, name="account-token-revoke"),
    path("account/keys/", account.key_add, name="account-key-add"),
    path("account/keys/<int:pk>/delete/", account.key_delete, name="account-key-delete"),
    path("account/keys/<int:pk>/refresh/", account.key_refresh, name="account-key-refresh"),
]

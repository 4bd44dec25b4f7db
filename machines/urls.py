from django.urls import path

from machines import clone_views, snapshot_views, views

app_name = "machines"
urlpatterns = [
    path("", views.machine_list, name="list"),
    path("new/", views.machine_create, name="create"),
    path("bulk/", views.machine_bulk, name="bulk"),
    path("new/preview/", views.machine_preview, name="preview"),
    path("new/fields/", views.machine_form_fields, name="form-fields"),
    path("<int:pk>/", views.machine_detail, name="detail"),
    path("<int:pk>/power/", views.machine_power, name="power"),
    path("<int:pk>/rebuild/", views.machine_rebuild, name="rebuild"),
    path("<int:pk>/grow-disk/", views.machine_grow_disk, name="grow-disk"),
    path("<int:pk>/snapshots/", snapshot_views.snapshot_take, name="snapshot-take"),
    path("<int:pk>/snapshots/<int:sid>/revert/", snapshot_views.snapshot_revert, name="snapshot-revert"),
    path("<int:pk>/snapshots/<int:sid>/delete/", snapshot_views.snapshot_delete, name="snapshot-delete"),
    path("<int:pk>/clone/", clone_views.machine_clone, name="clone"),
    path("<int:pk>/save-image/", clone_views.machine_save_image, name="save-image"),
    path("<int:pk>/protection/", views.machine_protect, name="protect"),
    path("<int:pk>/autostart/", views.machine_autostart, name="autostart"),
    path("<int:pk>/migrate/", views.machine_migrate, name="migrate"),
    path("<int:pk>/migrate/cancel/", views.machine_migrate_cancel, name="migrate-cancel"),
    path("hypervisors/<int:pk>/maintenance/", views.hypervisor_maintenance, name="hypervisor-maintenance"),
    path("hypervisors/<int:pk>/evacuate/", views.hypervisor_evacuate, name="hypervisor-evacuate"),
    path("<int:pk>/delete/", views.machine_delete, name="delete"),
    path("<int:pk>/console/", views.machine_console, name="console"),
    path("<int:pk>/console/token/", views.machine_console_token, name="console-token"),
    path("<int:pk>/serial/", views.machine_serial, name="serial"),
    path("<int:pk>/screenshot.png", views.machine_screenshot, name="screenshot"),
    path("<int:pk>/media/", views.machine_media, name="media"),
    path("<int:pk>/boot-cdrom/", views.machine_boot_cdrom, name="boot-cdrom"),
    path("<int:pk>/bmc/reveal/", views.machine_bmc_reveal, name="bmc-reveal"),
    path("<int:pk>/boot-device/", views.machine_boot_device, name="boot-device"),
    path("instackenv.json", views.machines_instackenv, name="instackenv"),
    path("hypervisors/<int:pk>/adopt/", views.hypervisor_adopt, name="adopt"),
    path("hypervisors/<int:pk>/orphans/remove/", views.hypervisor_orphans_remove, name="hypervisor-orphans-remove"),
]

from django.urls import path

from hypervisors import views

app_name = "hypervisors"
urlpatterns = [
    path("", views.hypervisor_list, name="list"),
    path("add/", views.hypervisor_create, name="create"),
    path("<int:pk>/", views.hypervisor_detail, name="detail"),
    path("<int:pk>/edit/", views.hypervisor_edit, name="edit"),
    path("<int:pk>/delete/", views.hypervisor_delete, name="delete"),
    path("<int:pk>/sync/", views.hypervisor_sync, name="sync"),
    path("<int:pk>/trust-host-key/", views.hypervisor_trust_host_key, name="trust-host-key"),
    path("<int:pk>/networks/", views.network_create, name="network-create"),
    path("<int:pk>/networks/<str:name>/delete/", views.network_delete, name="network-delete"),
    path("images/", views.image_list, name="image-list"),
    path("images/add/", views.image_create, name="image-create"),
    path("images/<int:pk>/", views.image_detail, name="image-detail"),
    path("images/<int:pk>/delete/", views.image_delete, name="image-delete"),
]

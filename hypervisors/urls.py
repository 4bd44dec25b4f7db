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
]

from django.urls import path

from metrics import views

app_name = "metrics"
urlpatterns = [
    path("machines/<int:pk>/", views.machine_data, name="machine"),
    path("hypervisors/<int:pk>/", views.hypervisor_data, name="hypervisor"),
]

from django.urls import path

from labs import schedule_views, views

app_name = "labs"
urlpatterns = [
    path("", views.lab_list, name="list"),
    path("<int:pk>/", views.lab_detail, name="detail"),
    path("<int:pk>/power/", views.lab_power, name="power"),
    path("<int:pk>/edit/", views.lab_edit, name="edit"),
    path("<int:pk>/delete/", views.lab_delete, name="delete"),
    path("<int:pk>/instackenv.json", views.lab_instackenv, name="instackenv"),
    path("<int:pk>/lease/", schedule_views.lab_lease, name="lease"),
    path("<int:pk>/schedules/", schedule_views.schedules_card, {"kind": "lab"}, name="schedules"),
    path("machines/<int:pk>/schedules/", schedule_views.schedules_card, name="machine-schedules"),
    path("schedules/<int:sid>/delete/", schedule_views.schedule_delete, name="schedule-delete"),
    path("templates/", views.template_list, name="template-list"),
    path("templates/new/", views.template_create, name="template-create"),
    path("templates/<int:pk>/", views.lab_instantiate, name="instantiate"),
    path("templates/<int:pk>/edit/", views.template_edit, name="template-edit"),
    path("templates/<int:pk>/delete/", views.template_delete, name="template-delete"),
]

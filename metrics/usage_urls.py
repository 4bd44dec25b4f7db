from django.urls import path

from metrics import usage_views

app_name = "usage"
urlpatterns = [
    path("", usage_views.usage_report, name="report"),
    path("usage.csv", usage_views.usage_csv, name="csv"),
]

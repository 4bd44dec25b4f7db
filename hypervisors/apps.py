from django.apps import AppConfig


class HypervisorsConfig(AppConfig):
    name = "hypervisors"

from django.apps import AppConfig


class LabsConfig(AppConfig):
    """Labs (named sets of machines handled together), lab templates, the AnsiStack inventory import and
    the Ansible inventory out. Above `machines`: it builds on machine services and nothing below imports it."""

    name = "labs"

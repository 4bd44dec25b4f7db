from django.apps import AppConfig


class ConfigConfig(AppConfig):
    """Installed only so Django finds the shell's management commands (bootstrap, serve); no models."""

    name = "config"
    verbose_name = "Portal site"

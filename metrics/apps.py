from django.apps import AppConfig


class MetricsConfig(AppConfig):
    """What machines and hypervisors use over time: samples taken from the reconcile's bulk read, their
    rollups, graphs, usage reports and the Prometheus endpoint. Above `machines`: it listens to the
    reconcile's signal and reads machines; nothing below imports it."""

    name = "metrics"

from django.apps import AppConfig


class MetricsConfig(AppConfig):
    """What machines and hypervisors use over time: samples taken from the reconcile's bulk read, their
    rollups, graphs, usage reports and the Prometheus endpoint. Above `machines`: it listens to the
    reconcile's signal and reads machines; nothing below imports it."""

    name = "metrics"

    def ready(self) -> None:
        from django.db.models.signals import pre_delete

        from machines.models import Machine
        from machines.services.observation import host_observed
        from metrics.collect import on_host_observed
        from metrics.rollup import on_machine_delete

        host_observed.connect(on_host_observed, dispatch_uid="metrics.collect")
        pre_delete.connect(on_machine_delete, sender=Machine, dispatch_uid="metrics.usage_on_delete")

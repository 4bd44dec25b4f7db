from django.conf import settings
from django.db import models

from hypervisors.models import Hypervisor
from machines.models import Machine, Project


class Resolution(models.IntegerChoices):
    """Seconds a point stands for: one-minute points are kept for a day, hourly ones for 90 days."""

    MINUTE = 60, "one minute"
    HOUR = 3600, "one hour"


# The measured rates of a machine point, and a host point's measured and counted fields: the collection writes
# them, the rollup averages or takes the most of them, the graphs read them.
MACHINE_RATES = (
    "cpu_pct",
    "memory_used_mib",
    "disk_read_bps",
    "disk_write_bps",
    "disk_read_iops",
    "disk_write_iops",
    "net_rx_bps",
    "net_tx_bps",
)
HOST_MEASURED = ("cpu_pct", "memory_used_mib")
HOST_COUNTED = (
    "memory_total_mib",
    "vcpus_allocated",
    "vcpus_capacity",
    "memory_allocated_mib",
    "memory_capacity_mib",
    "disk_allocated_gib",
    "machines_running",
)


class MachineSample(models.Model):
    """One point of a machine's series: rates over the interval that begins at `at`, and what it was given.

    A minute point comes from two consecutive bulk reads of its hypervisor; an hour point is the rollup of
    the hour's minute points (averages; `seconds_running` summed)."""

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="samples")
    resolution = models.PositiveIntegerField(choices=Resolution.choices)
    at = models.DateTimeField(help_text="Start of the interval, aligned to the resolution.")
    seconds_running = models.PositiveIntegerField(default=0, help_text="Of the interval, seconds it ran.")
    cpu_pct = models.FloatField(null=True, help_text="CPU time over wall time, per cent of its vCPUs.")
    memory_used_mib = models.FloatField(null=True, help_text="Memory the guest uses (balloon), where it tells.")
    disk_read_bps = models.FloatField(null=True)
    disk_write_bps = models.FloatField(null=True)
    disk_read_iops = models.FloatField(null=True)
    disk_write_iops = models.FloatField(null=True)
    net_rx_bps = models.FloatField(null=True)
    net_tx_bps = models.FloatField(null=True)
    # What it was given during the interval (the usage report's units come from these).
    vcpus = models.PositiveSmallIntegerField(default=0)
    memory_mib = models.PositiveIntegerField(default=0)
    disk_gib = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["machine", "resolution", "at"], name="machine_sample_once"),
        ]
        indexes = [models.Index(fields=["resolution", "at"], name="machine_sample_age")]

    def __str__(self) -> str:
        return f"{self.machine_id} @ {self.at:%Y-%m-%d %H:%M} ({self.get_resolution_display()})"


class HostSample(models.Model):
    """One point of a hypervisor's series: its own CPU and memory, and what its machines were given against
    its capacity."""

    hypervisor = models.ForeignKey(Hypervisor, on_delete=models.CASCADE, related_name="samples")
    resolution = models.PositiveIntegerField(choices=Resolution.choices)
    at = models.DateTimeField(help_text="Start of the interval, aligned to the resolution.")
    cpu_pct = models.FloatField(null=True, help_text="Host CPU busy over the interval, per cent of all its CPUs.")
    memory_used_mib = models.FloatField(null=True)
    memory_total_mib = models.FloatField(null=True)
    vcpus_allocated = models.PositiveIntegerField(default=0)
    vcpus_capacity = models.PositiveIntegerField(default=0, help_text="CPUs times the vCPU overcommit.")
    memory_allocated_mib = models.PositiveBigIntegerField(default=0)
    memory_capacity_mib = models.PositiveBigIntegerField(default=0)
    disk_allocated_gib = models.PositiveBigIntegerField(default=0)
    machines_running = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["hypervisor", "resolution", "at"], name="host_sample_once"),
        ]
        indexes = [models.Index(fields=["resolution", "at"], name="host_sample_age")]

    def __str__(self) -> str:
        return f"{self.hypervisor_id} @ {self.at:%Y-%m-%d %H:%M} ({self.get_resolution_display()})"


class HostCounters(models.Model):
    """The last bulk read's raw counters of a hypervisor and its domains, from which the next read's rates
    come: one row per hypervisor, rewritten every cycle (in the database, so any worker can take the next)."""

    hypervisor = models.OneToOneField(Hypervisor, on_delete=models.CASCADE, related_name="counters")
    read_at = models.FloatField(help_text="Wall-clock seconds (epoch) of the read.")
    read_seconds = models.FloatField(default=0.0, help_text="How long the hypervisor's bulk read took.")
    host = models.JSONField(default=dict)
    domains = models.JSONField(default=dict, help_text="Domain UUID -> its counters.")

    def __str__(self) -> str:
        return f"counters of {self.hypervisor_id}"


class UsageHour(models.Model):
    """What one machine used in one hour, kept after the machine is deleted (the usage report's rows).

    Written by the rollup from the hour's minute points, and for a machine being deleted, from those it has
    not rolled up yet."""

    at = models.DateTimeField(help_text="Start of the hour.")
    machine = models.ForeignKey(Machine, null=True, on_delete=models.SET_NULL, related_name="+")
    machine_uuid = models.UUIDField()
    machine_name = models.CharField(max_length=63)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    project = models.ForeignKey(Project, null=True, on_delete=models.SET_NULL, related_name="+")
    vcpu_hours = models.FloatField(default=0.0, help_text="vCPUs times hours running.")
    memory_gib_hours = models.FloatField(default=0.0, help_text="Memory (GiB) times hours running.")
    disk_gib_days = models.FloatField(default=0.0, help_text="Disk (GiB) times days it existed.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["machine_uuid", "at"], name="usage_hour_once")]
        indexes = [models.Index(fields=["at"], name="usage_hour_at")]

    def __str__(self) -> str:
        return f"{self.machine_name} @ {self.at:%Y-%m-%d %H:00}"

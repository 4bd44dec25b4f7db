from django.apps import AppConfig


class MachinesConfig(AppConfig):
    name = "machines"

    def ready(self) -> None:
        from hypervisors import networks
        from machines import consoles  # noqa: F401 - connects the logout receiver
        from machines.models import Membership, Project
        from portal import audit

        # Projects, their quotas and members: edited in the admin (forms, inlines, bulk deletes), recorded here.
        audit.track(
            Project,
            prefix="project",
            fields=["name", "description", "machines_quota", "vcpus_quota", "memory_mib_quota", "disk_gib_quota"],
        )
        audit.track(Membership, prefix="membership", fields=["project", "user", "role"])

        networks.NETWORK_USERS.append(_machines_on_network)
        networks.UNPUBLISHED_USERS.append(_machines_refused_on)


def _machines_on_network(hypervisor, name: str) -> str:
    """Why a network cannot be removed from a hypervisor: portal machines have NICs on it."""
    from machines.models import MachineNic

    if MachineNic.objects.filter(machine__hypervisor=hypervisor, type="network", source=name).exists():
        return f"Machines on {hypervisor.name} still use network {name}."
    return ""


def _machines_refused_on(kind: str, source: str) -> list[str]:
    """Machines whose NIC of this kind on this source the network policy now refuses."""
    from machines.nic_policy import machines_against_policy

    found = {
        (m.hypervisor.name, m.name)
        for m, _ in machines_against_policy()
        if any((n.type, n.source) == (kind, source) for n in m.nics.all())
    }
    return [f"{name} on {hv}" for hv, name in sorted(found)]

from django.apps import AppConfig


class MachinesConfig(AppConfig):
    name = "machines"

    def ready(self) -> None:
        from hypervisors import networks
        from machines import consoles  # noqa: F401 - connects the logout receiver

        networks.NETWORK_USERS.append(_machines_on_network)


def _machines_on_network(hypervisor, name: str) -> str:
    """Why a network cannot be removed from a hypervisor: portal machines have NICs on it."""
    from machines.models import MachineNic

    if MachineNic.objects.filter(machine__hypervisor=hypervisor, type="network", source=name).exists():
        return f"Machines on {hypervisor.name} still use network {name}."
    return ""

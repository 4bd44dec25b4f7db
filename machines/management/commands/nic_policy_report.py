from django.core.management.base import BaseCommand, CommandError

from machines.nic_policy import machines_against_policy


class Command(BaseCommand):
    help = (
        "List the machines of users who are not staff that have a NIC the network policy refuses (user-mode "
        "networking, macvtap passthrough, a host network or VLAN tag nobody published to them), e.g. machines "
        "made before the policy. Exits 1 when there are any."
    )

    def handle(self, *args, **options):
        found = machines_against_policy()
        for machine, reason in found:
            self.stdout.write(
                f"{machine.hypervisor.name}/{machine.name} (#{machine.pk}, {machine.owner.get_username()}): {reason}"
            )
        if found:
            raise CommandError(
                f"{len(found)} NIC(s) against the network policy: change them, or publish the network "
                "(Admin → Published networks)."
            )
        self.stdout.write("Every machine's NICs follow the network policy.")

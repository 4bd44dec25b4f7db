"""Who sees which graphs: a machine's, whoever may see the machine (machines.access, as its page decides;
anyone else gets a 404 that says nothing of whether it exists); a hypervisor's, staff only."""

from machines.access import machines_for

MAX_ID = 2**63 - 1  # past it, a lookup by id would overflow the database's integer


def machine_visible(user, pk: int) -> bool:
    """Whether `user` may see machine `pk` (one query)."""
    return 0 < pk <= MAX_ID and machines_for(user).filter(pk=pk).exists()


def hypervisor_graphs_allowed(user) -> bool:
    return bool(user.is_authenticated and user.is_active and user.is_staff)

"""Who may see and act on which machine. Owners and staff for now; projects and roles come later."""

from machines.models import Machine


def machines_for(user):
    """The machines a user may see: their own; staff see all."""
    qs = Machine.objects.select_related("hypervisor", "image", "owner")
    if not user.is_authenticated or not user.is_active:
        return qs.none()
    return qs if user.is_staff else qs.filter(owner=user)


def can_use(user, machine: Machine) -> bool:
    return user.is_active and (user.is_staff or machine.owner_id == user.pk)

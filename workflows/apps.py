from django.apps import AppConfig


class WorkflowsConfig(AppConfig):
    """Workflows: Ansible playbooks run by ansible-runner against machines and labs. On top of `labs`: a run's
    inventory is the portal's Ansible inventory (labs/inventory.py) of its targets."""

    name = "workflows"

from django.apps import AppConfig


class MachinesConfig(AppConfig):
    name = "machines"

    def ready(self) -> None:
        from machines import consoles  # noqa: F401 - connects the logout receiver

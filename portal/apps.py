from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal"

    def ready(self) -> None:
        from django.conf import settings

        from portal import audit  # connects the login/logout and token-deletion receivers

        audit.track(
            settings.AUTH_USER_MODEL,
            prefix="user",
            fields=["username", "email", "first_name", "last_name"],
            flags=["is_active", "is_staff", "is_superuser"],
            secret=["password"],
        )

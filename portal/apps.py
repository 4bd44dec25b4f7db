from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal"

    def ready(self) -> None:
        from django.conf import settings
        from django.contrib import admin

        # Importing these connects their receivers: audit's login, logout and token deletion; throttle's
        # failed-login counting.
        from portal import audit, throttle

        admin.site.login_form = throttle.ThrottledAdminAuthenticationForm

        audit.track(
            settings.AUTH_USER_MODEL,
            prefix="user",
            fields=["username", "email", "first_name", "last_name"],
            flags=["is_active", "is_staff", "is_superuser"],
            secret=["password"],
        )

from django.apps import AppConfig, apps


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
        user_model = apps.get_model(settings.AUTH_USER_MODEL)
        audit.track_m2m(user_model, "groups", prefix="user")
        audit.track_m2m(user_model, "user_permissions", prefix="user")

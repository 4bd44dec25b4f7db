"""Validation of hypervisor input, shared by forms, the API and the admin (via the model)."""

import ipaddress
import re
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

REMOTE_SCHEMES = ("qemu+ssh", "qemu+tls", "qemu+tcp")
ALLOWED_SCHEMES = ("qemu", *REMOTE_SCHEMES)
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _allowed_schemes() -> tuple[str, ...]:
    return (*ALLOWED_SCHEMES, "test") if settings.PORTAL_ALLOW_TEST_URIS else ALLOWED_SCHEMES


def validate_libvirt_uri(uri: str) -> None:
    """A libvirt URI the portal can use: qemu (local or remote) or, where allowed, test."""
    if not uri or any(c.isspace() for c in uri):
        raise ValidationError("Enter a libvirt URI without spaces, e.g. qemu:///system or qemu+ssh://root@host/system.")
    parts = urlsplit(uri)
    if not parts.scheme or "://" not in uri:
        raise ValidationError(f"{uri!r} is not a libvirt URI: expected scheme://[host]/path, e.g. qemu:///system.")
    allowed = _allowed_schemes()
    if parts.scheme not in allowed:
        raise ValidationError(f"Scheme {parts.scheme!r} is not supported; use one of: {', '.join(allowed)}.")
    if parts.scheme == "test":
        if parts.path not in ("/default",) and not parts.path.endswith(".xml"):
            raise ValidationError("A test URI is test:///default or test:///path/to/config.xml.")
        return
    if parts.path not in ("/system", "/session"):
        raise ValidationError("A QEMU URI ends in /system (or /session), e.g. qemu+ssh://root@host/system.")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValidationError("The port in the URI is not a number between 1 and 65535.") from None
    if parts.scheme in REMOTE_SCHEMES:
        if not host:
            raise ValidationError(f"A {parts.scheme} URI needs a host: {parts.scheme}://host/system.")
        if not _is_host(host):
            raise ValidationError(f"{host!r} is not a valid host name or address.")
    elif host:
        raise ValidationError(
            "A plain qemu URI is local (qemu:///system); for a remote host use qemu+ssh, qemu+tls or qemu+tcp."
        )
    if port == 0:
        raise ValidationError("The port in the URI is not a number between 1 and 65535.")


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.match(host))


def validate_listen_address(value: str) -> None:
    """Console listen address: an IP address of the hypervisor."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(
            f"{value!r} is not an IP address (e.g. 127.0.0.1 or the hypervisor's management address)."
        ) from None

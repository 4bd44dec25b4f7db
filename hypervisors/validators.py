"""Validation of hypervisor input, shared by forms, the API and the admin (via the model)."""

import ipaddress
import re
from urllib.parse import parse_qsl, urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

REMOTE_SCHEMES = ("qemu+ssh", "qemu+tls", "qemu+tcp")

# The query parameters of libvirt's remote driver a hypervisor's URI may carry, by scheme: where to find this
# side's credentials and the far side's socket. Every other one is refused: `no_verify` (skips the server's
# certificate check), `known_hosts_verify` (skips the SSH host key), `command` and `netcat` (programs the
# worker would run, here or on the hypervisor), `proxy`, `no_tty`, `name`.
URI_PARAMETERS = {
    "qemu+tls": {"pkipath", "socket", "mode"},
    "qemu+ssh": {"keyfile", "known_hosts", "sshauth", "socket", "mode"},
    "qemu+tcp": {"socket", "mode"},
    "qemu": {"socket"},  # a libvirtd of its own on this machine (the tests' private ones)
}
_PATH_PARAMETERS = {"pkipath", "keyfile", "known_hosts", "socket"}
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
_CHOICES = {"mode": {"auto", "legacy", "direct"}, "sshauth": {"privkey", "agent", "password", "keyboard-interactive"}}
# Why the most tempting refused parameters are refused, said with the refusal. libvirt reads parameter names
# in any case, so they are matched in lower case.
_REFUSED_BECAUSE = {
    "no_verify": (
        "no_verify=1 makes libvirt accept any SSH host key (qemu+ssh) or server certificate (qemu+tls), so "
        "a machine impersonating the host would be trusted; the portal pins the host key instead "
        "(trust it on the hypervisor's page)"
    ),
    "known_hosts_verify": "it would let the worker skip or auto-add the host key; the portal pins host keys",
    "command": "it names a program the worker would run; the portal runs its own ssh client",
    "netcat": "it names a program run on the hypervisor",
}
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
    _validate_parameters(parts.scheme, parts.query, parts.fragment)


def _validate_parameters(scheme: str, query: str, fragment: str) -> None:
    """Only the parameters of URI_PARAMETERS, each once, paths absolute and plain, choices from their list."""
    if fragment:
        raise ValidationError("A libvirt URI has no #fragment.")
    if not query:
        return
    allowed = URI_PARAMETERS.get(scheme, set())
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValidationError("The URI's query string is not name=value pairs joined by &.") from None
    seen: set[str] = set()
    for name, value in pairs:
        if name not in allowed:
            offer = f"; a {scheme} URI may carry {', '.join(sorted(allowed))}" if allowed else ""
            because = _REFUSED_BECAUSE.get(name.lower())
            raise ValidationError(
                f"The URI parameter {name!r} is not allowed{offer}."
                + (f" Refused because {because}." if because else "")
            )
        if name in seen:
            raise ValidationError(f"The URI parameter {name!r} is given twice.")
        seen.add(name)
        if name in _PATH_PARAMETERS and (not _SAFE_PATH.fullmatch(value) or "/../" in f"{value}/"):
            raise ValidationError(f"{name} must be an absolute path of letters, digits and . _ - + /.")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValidationError(f"{name} is one of {', '.join(sorted(_CHOICES[name]))}.")


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

"""The worker's side of qemu+ssh hypervisors: its own ed25519 key pair, the known_hosts file of host keys
that staff pinned, and the ssh client that libvirt runs.

libvirt's ssh transport runs the OpenSSH client with a cleared environment and no way to pass it
options, except the URI parameter `command` (the program to run as ssh). The portal gives it a wrapper
of its own that runs `ssh -F <the portal's ssh_config>`: OpenSSH then reads neither ~/.ssh/config nor
/etc/ssh/ssh_config, uses only the worker's key, and checks the host key against the portal's
known_hosts with StrictHostKeyChecking=yes and nothing else (no global file, no DNS, never adding a key).
An unknown or changed host key therefore fails the connection ("Host key verification failed"); the
portal then shows the key the host offers and waits for staff to trust it. Files live in
DATA_DIR/ssh/, the directory 0700 and the private key 0600, owned by the process's user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings

from hypervisors.drivers.base import HypervisorFatalError

SSH_PORT = 22
SCAN_TIMEOUT = 5  # seconds ssh-keyscan waits for the host
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
)
_LABELS = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA"}
# ssh_config expands % and ~ in file names, and splits on spaces and quotes: the portal's paths are plain.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
# What OpenSSH prints when StrictHostKeyChecking refuses a host key (unknown or changed); libvirt passes it on.
HOST_KEY_REFUSED = "Host key verification failed"


class HostKeyError(ValueError):
    """Text that is not an SSH public host key."""


@dataclass(frozen=True)
class HostKey:
    type: str  # ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa
    blob: str  # base64 of the key in SSH wire format

    @property
    def line(self) -> str:
        return f"{self.type} {self.blob}"

    @property
    def fingerprint(self) -> str:
        """As `ssh-keygen -lf` prints it: SHA256:<base64 of the SHA-256 of the key, unpadded>."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def label(self) -> str:
        kind = _LABELS.get(self.type) or ("ECDSA" if self.type.startswith("ecdsa") else self.type)
        return f"{kind} {self.fingerprint}"


def parse_host_keys(text: str) -> list[HostKey]:
    """Host keys from lines as in a .pub file (`type base64 [comment]`), a known_hosts file or ssh-keyscan's
    output (`host type base64`); blank lines and # comments are skipped. HostKeyError on anything else."""
    keys: list[HostKey] = []
    for raw in text.splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] not in KEY_TYPES and len(words) > 1 and words[1] in KEY_TYPES:
            words = words[1:]  # a known_hosts or ssh-keyscan line: the host comes first
        if len(words) < 2 or words[0] not in KEY_TYPES:
            raise HostKeyError(f"not an SSH public key line: {raw.strip()[:60]!r} (expected e.g. ssh-ed25519 AAAA...)")
        key = HostKey(words[0], words[1])
        _check_blob(key)
        if key not in keys:
            keys.append(key)
    return keys


def _check_blob(key: HostKey) -> None:
    """The base64 decodes to SSH wire format that names the same key type as the line."""
    try:
        data = base64.b64decode(key.blob, validate=True)
        (length,) = struct.unpack(">I", data[:4])
        named = data[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise HostKeyError(f"the {key.type} key is not valid base64 of an SSH key") from None
    expected = "ssh-rsa" if key.type.startswith("rsa-sha2") else key.type
    if named != expected or len(data) < 4 + length + 4:
        raise HostKeyError(f"the key's data is a {named or 'broken'} key, not {key.type}")


def format_host_keys(keys: Iterable[HostKey]) -> str:
    return "".join(f"{k.line}\n" for k in keys)


def known_hosts_name(host: str, port: int | None) -> str:
    """The host as OpenSSH looks it up in known_hosts: `host`, or `[host]:port` off port 22."""
    return host if not port or port == SSH_PORT else f"[{host}]:{port}"


def ssh_peer(uri: str) -> tuple[str, int] | None:
    """(host, port) of a qemu+ssh URI; None for every other transport."""
    parts = urlsplit(uri)
    if parts.scheme != "qemu+ssh" or not parts.hostname:
        return None
    return parts.hostname, parts.port or SSH_PORT


# --- the portal's files ---


def ssh_dir() -> Path:
    return Path(settings.DATA_DIR) / "ssh"


@dataclass(frozen=True)
class SshFiles:
    directory: Path

    @property
    def identity(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def public(self) -> Path:
        return self.directory / "id_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    @property
    def config(self) -> Path:
        return self.directory / "ssh_config"

    @property
    def command(self) -> Path:
        return self.directory / "ssh"


def files(directory: Path | None = None) -> SshFiles:
    directory = directory or ssh_dir()
    if not _PLAIN_PATH.fullmatch(str(directory)):
        raise HypervisorFatalError(
            f"the portal's SSH directory {directory} must be an absolute path of letters, digits and . _ - + /"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        directory.chmod(0o700)
    return SshFiles(directory)


def _write_atomic(path: Path, text: str, mode: int) -> bool:
    """Replace `path` with `text` (a rename: readers see the old or the new file, whole) unless it already
    holds exactly that; True when it wrote."""
    try:
        if path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def ensure_identity(directory: Path | None = None) -> str:
    """The worker's public key line (`ssh-ed25519 AAAA... ansistack-portal-worker`), the pair made on first
    need: the private key created 0600 and never replaced (two processes racing make one key)."""
    f = files(directory)
    if not f.identity.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        try:
            fd = os.open(f.identity, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile: use that one
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
    if f.identity.stat().st_mode & 0o077:
        f.identity.chmod(0o600)  # OpenSSH refuses a private key others can read
    private = serialization.load_ssh_private_key(f.identity.read_bytes(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} ansistack-portal-worker\n"
    _write_atomic(f.public, line, 0o644)
    return line.strip()


def write_known_hosts(entries: Iterable[tuple[str, int, HostKey]], directory: Path | None = None) -> Path:
    """The portal's known_hosts: exactly the pinned keys, one line per (host, port, key); nothing else."""
    f = files(directory)
    lines = sorted({f"{known_hosts_name(host, port)} {key.line}\n" for host, port, key in entries})
    _write_atomic(f.known_hosts, "# Written by the portal from the host keys staff trusted.\n" + "".join(lines), 0o600)
    return f.known_hosts


def _config_text(f: SshFiles) -> str:
    return (
        "# Written by the portal: the only configuration of the ssh client libvirt runs for qemu+ssh.\n"
        "Host *\n"
        f"    IdentityFile {f.identity}\n"
        "    IdentitiesOnly yes\n"
        "    IdentityAgent none\n"
        f"    UserKnownHostsFile {f.known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n"
        "    UpdateHostKeys no\n"
        "    CheckHostIP no\n"
        "    VerifyHostKeyDNS no\n"
        "    BatchMode yes\n"
        "    PasswordAuthentication no\n"
        "    KbdInteractiveAuthentication no\n"
        "    ConnectTimeout 10\n"
        "    ServerAliveInterval 5\n"
        "    ServerAliveCountMax 3\n"
        "    ControlMaster no\n"
        "    ControlPath none\n"
        "    ForwardAgent no\n"
        "    ForwardX11 no\n"
        "    LogLevel ERROR\n"
    )


def ensure_client(directory: Path | None = None) -> Path:
    """The worker's key, an empty known_hosts if none yet, the ssh_config and the wrapper libvirt runs as its
    ssh; returns the wrapper's path."""
    f = files(directory)
    ensure_identity(f.directory)
    if not f.known_hosts.exists():
        write_known_hosts([], f.directory)
    ssh = shutil.which("ssh")
    if ssh is None:
        raise HypervisorFatalError("the OpenSSH client (ssh) is not installed on the worker's machine")
    _write_atomic(f.config, _config_text(f), 0o600)
    wrapper = (
        "#!/bin/sh\n"
        "# Written by the portal: libvirt runs this as ssh for qemu+ssh hypervisors (URI parameter command=).\n"
        f'exec {shlex.quote(ssh)} -F {shlex.quote(str(f.config))} "$@"\n'
    )
    _write_atomic(f.command, wrapper, 0o700)
    return f.command


def libvirt_uri(uri: str, directory: Path | None = None) -> str:
    """The URI libvirt opens for the portal's `uri`: a qemu+ssh one runs the portal's ssh wrapper with no
    terminal (never a prompt); others are unchanged."""
    if ssh_peer(uri) is None:
        return uri
    command = ensure_client(directory)
    sep = "&" if urlsplit(uri).query else "?"
    return f"{uri}{sep}command={command}&no_tty=1"


def host_key_refused(message: str) -> bool:
    """Whether a connection error is OpenSSH refusing the host's key (unknown to, or other than, the pinned)."""
    return HOST_KEY_REFUSED in message


def scan_host_keys(host: str, port: int, timeout: int = SCAN_TIMEOUT) -> list[HostKey]:
    """The host keys `host:port` offers (ssh-keyscan), for staff to compare and trust; [] when it says none."""
    keyscan = shutil.which("ssh-keyscan")
    if keyscan is None:
        raise HypervisorFatalError("ssh-keyscan (OpenSSH client) is not installed on the worker's machine")
    try:
        r = subprocess.run(
            [keyscan, "-T", str(timeout), "-p", str(port), "--", host],
            capture_output=True,
            text=True,
            timeout=timeout * 4,
        )
    except subprocess.TimeoutExpired:
        return []
    try:
        return parse_host_keys(r.stdout)
    except HostKeyError:
        return []

"""OpenSSH public key lines: checked field by field and normalised, for the account page's keys and for
the keys a machine's cloud-init seed carries; their fingerprints; and the sources keys are fetched from (a URL,
`gh:<user>`, `lp:<user>`), checked and expanded."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit


class InvalidSSHKey(ValueError):
    """A public key line that is not one well-formed OpenSSH key; the message says what is wrong."""


# Number of length-prefixed fields in each key type's blob (RFC 4253 §6.6, PROTOCOL.u2f).
_KEY_FIELDS = {
    "ssh-ed25519": 2,
    "ssh-rsa": 3,
    "ecdsa-sha2-nistp256": 3,
    "ecdsa-sha2-nistp384": 3,
    "ecdsa-sha2-nistp521": 3,
    "sk-ssh-ed25519@openssh.com": 3,
    "sk-ecdsa-sha2-nistp256@openssh.com": 4,
}


def validate_ssh_key(line: str) -> str:
    """One OpenSSH public key line ("type base64 [comment]"); returns it normalised."""
    line = line.strip()
    if line.startswith("-----BEGIN"):
        raise InvalidSSHKey("This is a private key: paste the public key (the .pub file) instead.")
    if any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in line):
        raise InvalidSSHKey(f"SSH key {_abbrev(line)!r}: one key per line, without control characters.")
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise InvalidSSHKey(f"SSH key {_abbrev(line)!r}: expected 'type base64-data [comment]'.")
    ktype, body = parts[0], parts[1]
    if ktype not in _KEY_FIELDS:
        raise InvalidSSHKey(f"SSH key type {ktype[:40]!r} is not supported; use one of: {', '.join(_KEY_FIELDS)}.")
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        raise InvalidSSHKey(f"SSH key {_abbrev(line)!r}: the key data is not valid base64.") from None
    if not _fields_match(ktype, _ssh_fields(blob)):
        raise InvalidSSHKey(f"SSH key {_abbrev(line)!r}: the key data is not a valid {ktype} key.")
    comment = parts[2].strip() if len(parts) > 2 else ""
    return " ".join(p for p in (ktype, base64.b64encode(blob).decode("ascii"), comment) if p)


def _abbrev(line: str) -> str:
    return line if len(line) <= 24 else line[:20] + "…"


def _ssh_fields(blob: bytes) -> list[bytes]:
    """Split a key blob into its length-prefixed strings; [] if it does not split exactly."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(blob):
        size = int.from_bytes(blob[pos : pos + 4], "big")
        if pos + 4 + size > len(blob):
            return []
        fields.append(blob[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return fields


def _fields_match(ktype: str, fields: list[bytes]) -> bool:
    if len(fields) != _KEY_FIELDS[ktype] or fields[0] != ktype.encode("ascii"):
        return False
    if "ed25519" in ktype:
        return len(fields[1]) == 32
    if "ecdsa" in ktype:  # the curve is named twice: in the type and in the blob
        return fields[1] == re.search(r"nistp\d+", ktype).group().encode("ascii")  # type: ignore[union-attr]
    return True


# What `ssh-keygen -l` calls each key type, after its bit count and fingerprint.
_KEYGEN_NAMES = {
    "ssh-ed25519": "ED25519",
    "ssh-rsa": "RSA",
    "ecdsa-sha2-nistp256": "ECDSA",
    "ecdsa-sha2-nistp384": "ECDSA",
    "ecdsa-sha2-nistp521": "ECDSA",
    "sk-ssh-ed25519@openssh.com": "ED25519-SK",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK",
}


@dataclass(frozen=True)
class KeyInfo:
    """A valid key line as `ssh-keygen -l` shows it: `256 SHA256:… comment (ED25519)`."""

    line: str
    bits: int
    fingerprint: str  # SHA256:<unpadded base64 of the SHA-256 of the key blob>
    comment: str
    kind: str  # ED25519, RSA, ECDSA, ED25519-SK, ECDSA-SK

    def __str__(self) -> str:
        return f"{self.bits} {self.fingerprint} {self.comment or 'no comment'} ({self.kind})"


def describe(line: str) -> KeyInfo:
    """The fingerprint, size and type of one key line (validated first: InvalidSSHKey if it is not one)."""
    line = validate_ssh_key(line)
    parts = line.split(None, 2)
    ktype, blob = parts[0], base64.b64decode(parts[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    fields = _ssh_fields(blob)
    if ktype == "ssh-rsa":  # e, n: the modulus is an mpint, a leading zero byte keeps it positive
        bits = int.from_bytes(fields[2], "big").bit_length()
    elif "ecdsa" in ktype:
        bits = int(re.search(r"nistp(\d+)", ktype).group(1))  # type: ignore[union-attr]
    else:
        bits = 256
    return KeyInfo(line, bits, f"SHA256:{digest}", parts[2] if len(parts) > 2 else "", _KEYGEN_NAMES[ktype])


class InvalidKeySource(ValueError):
    """A key source that is not an allowed URL or short name; the message says what is wrong."""


# Short names, as MAAS and ssh-import-id take them, each with its user-name rule: GitHub's (letters, digits,
# single hyphens inside, at most 39) and Launchpad's (lower case letters, digits, `+ - .`, starting with a
# letter or digit, 2 to 64).
SHORT_NAMES = {
    "gh": ("https://github.com/{}.keys", re.compile(r"(?=[A-Za-z0-9-]{1,39}\Z)[A-Za-z0-9](?:-?[A-Za-z0-9])*")),
    "lp": ("https://launchpad.net/~{}/+sshkeys", re.compile(r"[a-z0-9][a-z0-9+.-]{1,63}")),
}
MAX_SOURCE_LENGTH = 300  # SshKey.source


def parse_source(text: str, *, allow_http: bool = False) -> str:
    """A key source (`gh:<user>`, `lp:<user>` or an https URL; http too where allowed), normalised."""
    text = text.strip()
    if not text:
        raise InvalidKeySource("Give a URL or a short name such as gh:<user> or lp:<user>.")
    if len(text) > MAX_SOURCE_LENGTH:
        raise InvalidKeySource(f"A key source is at most {MAX_SOURCE_LENGTH} characters.")
    if any(ord(c) <= 32 or ord(c) >= 127 for c in text):
        raise InvalidKeySource("A key source has no spaces, control or non-ASCII characters (percent-encode them).")
    prefix, colon, user = text.partition(":")
    if colon and prefix.lower() in SHORT_NAMES:
        pattern = SHORT_NAMES[prefix.lower()][1]
        if not pattern.fullmatch(user):
            site = "GitHub" if prefix.lower() == "gh" else "Launchpad"
            raise InvalidKeySource(f"{user[:40]!r} is not a {site} user name.")
        return f"{prefix.lower()}:{user}"
    schemes = ("https", "http") if allow_http else ("https",)
    parts = urlsplit(text)
    if parts.scheme.lower() not in schemes:
        shown = "an https:// URL" if not allow_http else "an http:// or https:// URL"
        raise InvalidKeySource(f"Give {shown} or a short name (gh:<user>, lp:<user>); not {text[:60]!r}.")
    try:
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise InvalidKeySource(f"The port in {text[:60]!r} is not a number from 0 to 65535.") from None
    if not parts.hostname:
        raise InvalidKeySource("The URL names no host.")
    if parts.username is not None or parts.password is not None:
        raise InvalidKeySource("The URL may not carry a user name or password (it is shown on your account page).")
    if parts.fragment:
        raise InvalidKeySource("The URL may not have a #fragment.")
    return text


def source_url(source: str) -> str:
    """The URL a parsed source is fetched from (a short name expanded)."""
    prefix, _colon, user = source.partition(":")
    if prefix in SHORT_NAMES:
        return SHORT_NAMES[prefix][0].format(user)
    return source

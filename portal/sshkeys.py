"""OpenSSH public key lines: checked field by field and normalised, for the account page's keys and for
the keys a machine's cloud-init seed carries."""

from __future__ import annotations

import base64
import binascii
import re


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

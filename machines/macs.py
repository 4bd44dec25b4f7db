"""The one MAC address rule, for every deploy type and every entry point (the form, the API, the admin's
model checks, the services and the cloud-init builder): well-formed, unicast, normalised; the services also
keep each one unique across the portal."""

from __future__ import annotations

import re

# Six pairs of hex digits, separated by colons or by dashes (the same throughout), or not at all.
_MAC = re.compile(r"[0-9a-f]{2}(?P<sep>[:-]?)[0-9a-f]{2}(?:(?P=sep)[0-9a-f]{2}){4}")


class InvalidMac(ValueError):
    """Why a text is not a MAC address a NIC may have; the message follows "MAC address ", for the person
    who typed it."""


def normalise_mac(text: str) -> str:
    """`text` as the portal keeps MACs ("52:54:00:ab:cd:ef"), or InvalidMac: not six hex pairs, or an
    address no NIC may have (multicast, broadcast, all zeros), which guests and switches would mishandle."""
    raw = text.strip().lower()
    if len(raw) > 17 or not _MAC.fullmatch(raw):
        raise InvalidMac(f"{text[:40]!r} is not valid: write six hex pairs, like 52:54:00:12:34:56.")
    digits = raw.replace(":", "").replace("-", "")
    mac = ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    if digits == "f" * 12:
        raise InvalidMac(f"{mac} is the broadcast address, not one a NIC may have.")
    if int(digits[:2], 16) & 1:
        raise InvalidMac(f"{mac} is a multicast address; a NIC's MAC is unicast (its first octet even).")
    if digits == "0" * 12:
        raise InvalidMac(f"{mac} (all zeros) is not a usable MAC address.")
    return mac

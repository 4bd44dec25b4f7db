"""Secrets at rest (BMC passwords): Fernet with a key derived from SECRET_KEY.

Changing SECRET_KEY makes stored BMC passwords unreadable; set new ones then.
"""

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


def _fernet() -> Fernet:
    digest = hashlib.sha256(b"ansistack-portal bmc passwords:" + settings.SECRET_KEY.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt(text: str) -> str:
    return _fernet().encrypt(text.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError("cannot decrypt: SECRET_KEY changed since this secret was stored") from None

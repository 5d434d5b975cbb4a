"""Secrets the portal must show again later (Jupyter tokens) are stored encrypted with Fernet."""

import base64
import hashlib
import secrets
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


@lru_cache(maxsize=1)
def _fernet() -> Fernet:
    key = settings.PORTAL_FIELD_ENCRYPTION_KEY
    if not key:
        # Derived from SECRET_KEY so a development install needs no extra variable; production sets its own.
        digest = hashlib.sha256(f"portal-field-encryption:{settings.SECRET_KEY}".encode()).digest()
        key = base64.urlsafe_b64encode(digest).decode()
    return Fernet(key)


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str) -> str:
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("The stored secret cannot be decrypted with the current key.") from exc


def new_jupyter_token() -> str:
    return secrets.token_urlsafe(32)

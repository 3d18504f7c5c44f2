"""Secrets the catalog must keep (a server's password), sealed with a key kept outside it.

AES-256-GCM from the `cryptography` package. The key lives in SECRETS_KEY_FILE (mode 0600,
made by the first migrate of a new portal, like the journal's key, and never at use: a worker
that made its own would seal passwords no other host can open): a copy of the catalog
without that file gives up no password. Each secret is sealed for a context (a password: the user, host and port it
was entered for) and opens for that context only, so a sealed value copied onto another
server's row, or a row whose host was edited behind the portal's back, opens for nobody.
"""

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings

PREFIX = "aesgcm1:"
NONCE_BYTES = 12


class SealError(Exception):
    """A sealed secret cannot be opened or made; the message says what to do."""


def seal(secret: str, context: str) -> str:
    """The secret encrypted for `context`, as text fit for a column."""
    nonce = os.urandom(NONCE_BYTES)
    box = AESGCM(_key()).encrypt(nonce, secret.encode(), context.encode())
    return PREFIX + base64.b64encode(nonce + box).decode()


def unseal(sealed: str, context: str) -> str:
    """The secret back, or SealError when the key is missing or another, or the value was altered."""
    if not sealed.startswith(PREFIX):
        raise SealError("a stored secret is not sealed by this portal: enter it again")
    try:
        raw = base64.b64decode(sealed[len(PREFIX) :], validate=True)
        return AESGCM(_key()).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
    except (InvalidTag, ValueError):
        raise SealError(
            f"a stored password does not open with the secrets key {key_path()} (another key, or an altered "
            "catalog): put back the key it was sealed with, or enter the password again"
        ) from None


def key_path() -> Path:
    return Path(settings.SECRETS_KEY_FILE)


def _key() -> bytes:
    path = key_path()
    if not path.exists():
        raise SealError(
            f"the secrets key {path} (SECRETS_KEY_FILE) is missing, and no stored password opens without it: "
            "copy it from the portal's host (mode 0600); only the first migrate of a new portal makes one"
        )
    if path.stat().st_mode & 0o077:
        raise SealError(f"the secrets key {path} can be read by others: chmod 600 {path}")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise SealError(f"the secrets key {path} is not 64 hex digits: put back the key file the portal made")
    return key


def create_key() -> bool:
    """Make the key (0600) when there is none; True when made. Only migrate calls it."""
    path = key_path()
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process's migrate made it a moment ago
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return True

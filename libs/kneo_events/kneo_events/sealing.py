"""Sealing of secrets that must live in the event log (webhook signing secrets): AES-256-GCM.

The log is the truth and is read widely (audit, history APIs, the bus), so a secret is stored there only sealed:
``{"alg": "A256GCM", "kid", "nonce", "ct"}`` with the owner's id as associated data (a sealed value copied to
another record does not open). Keys come from ``KNEO_WEBHOOKS_SECRET_KEY`` (comma-separated; the first seals, every
one opens, so a key can be rotated) or, when it is unset, from a key file generated once under the data dir
(``<data_dir>/webhooks.key``, mode 0600). Every process that seals or opens (gateways, webhooks services) needs the
same keys; the key id in each sealed value says which key it needs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("kneo.sealing")
ALG = "A256GCM"
KEY_FILE = "webhooks.key"


class SealError(Exception):
    """A sealed value cannot be opened (unknown key id, wrong key, tampered value) or a key is malformed."""


def parse_keys(raw: str) -> list[bytes]:
    """Decode ``KNEO_WEBHOOKS_SECRET_KEY``: comma-separated 32-byte keys, each in base64 (either alphabet) or hex."""
    keys: list[bytes] = []
    for item in filter(None, (k.strip() for k in raw.split(","))):
        key = _decode_key(item)
        if key is None:
            raise ValueError(
                "KNEO_WEBHOOKS_SECRET_KEY: each key must be 32 bytes in base64 or hex "
                "(generate one with: openssl rand -base64 32)"
            )
        keys.append(key)
    if not keys:
        raise ValueError("KNEO_WEBHOOKS_SECRET_KEY is empty")
    return keys


def _decode_key(item: str) -> bytes | None:
    if len(item) == 64:
        try:
            return bytes.fromhex(item)
        except ValueError:
            pass
    try:
        key = base64.b64decode(item.replace("-", "+").replace("_", "/") + "=" * (-len(item) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None


def key_id(key: bytes) -> str:
    """A short public name of a key (a hash prefix: says which key sealed a value, reveals nothing of it)."""
    return hashlib.sha256(b"kneo-sealing:" + key).hexdigest()[:12]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Keyring:
    """The sealing keys of one process: the first seals, every key opens."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self.current = key_id(keys[0])

    def seal(self, plaintext: str, owner: str) -> dict[str, Any]:
        """Encrypt ``plaintext`` for ``owner`` (the associated data: the value opens only for that owner)."""
        nonce = secrets.token_bytes(12)
        ct = self._keys[self.current].encrypt(nonce, plaintext.encode(), owner.encode())
        return {"alg": ALG, "kid": self.current, "nonce": _b64(nonce), "ct": _b64(ct)}

    def open(self, sealed: dict[str, Any], owner: str) -> str:
        """Decrypt a value sealed for ``owner``; :class:`SealError` when it cannot be opened with these keys."""
        if sealed.get("alg") != ALG:
            raise SealError(f"unknown sealing algorithm {sealed.get('alg')!r}")
        kid = str(sealed.get("kid"))
        aead = self._keys.get(kid)
        if aead is None:
            raise SealError(
                f"the secret was sealed with key {kid}, which this process does not have (its keys: "
                f"{', '.join(self._keys)}); set the same KNEO_WEBHOOKS_SECRET_KEY on every gateway and webhooks process"
            )
        try:
            return aead.decrypt(_unb64(str(sealed["nonce"])), _unb64(str(sealed["ct"])), owner.encode()).decode()
        except (InvalidTag, KeyError, ValueError, binascii.Error) as exc:
            raise SealError(f"the sealed secret does not open with key {kid} (tampered or not its owner's)") from exc


def load_keyring(raw_keys: str | None, data_dir: Path) -> Keyring:
    """The keyring from ``KNEO_WEBHOOKS_SECRET_KEY``, or from the data dir's key file (created once, 0600).

    Blocking file I/O: call it through a thread from async code.
    """
    if raw_keys and raw_keys.strip():
        return Keyring(parse_keys(raw_keys))
    return Keyring([_key_file(data_dir.resolve() / KEY_FILE)])


def _key_file(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a complete file under a temporary name, then link it into place: two processes starting at once
        # both end up with the one key that won, never with a half-written file.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
            try:
                os.link(tmp, path)
                log.warning(
                    "generated the webhook secret sealing key %s; processes on other hosts need the same key: "
                    "set KNEO_WEBHOOKS_SECRET_KEY on every gateway and webhooks process",
                    path,
                )
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, mode)
    keys = parse_keys(path.read_text().strip())
    return keys[0]

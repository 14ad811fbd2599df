"""Encryption at rest for spooled and quarantined messages (AES-256-GCM).

Each sealed blob gets its own random data key, wrapped by the storage key
(from ``CGW_STORAGE_KEY`` or ``data_dir/keys/storage.key``). Content is sealed
in chunks so large messages need not be one buffer later; every chunk is bound
to the blob's reference and position, and the last one is marked, so a
truncated, reordered or swapped file fails to open instead of yielding a
shortened message.
"""

from __future__ import annotations

import base64
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.settings import Settings

MAGIC = b"CGW1"
CHUNK_SIZE = 1 << 20
_WRAP_NONCE = 12
_WRAPPED_KEY = _WRAP_NONCE + 32 + 16
_LENGTH = struct.Struct(">I")


class SealError(Exception):
    """A blob that does not open: wrong key, or changed on disk."""


class StorageKey:
    """The key-wrapping key; never written anywhere but its own 0600 file."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a storage key is 32 bytes")
        self._wrap = AESGCM(key)

    def seal(self, plaintext: bytes, ref: str) -> bytes:
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = secrets.token_bytes(_WRAP_NONCE)
        wrapped = nonce + self._wrap.encrypt(nonce, data_key, b"cgw-data-key|" + ref.encode())
        parts = [MAGIC, wrapped]
        aead = AESGCM(data_key)
        chunks = [plaintext[i : i + CHUNK_SIZE] for i in range(0, len(plaintext), CHUNK_SIZE)] or [
            b""
        ]
        for index, chunk in enumerate(chunks):
            sealed = aead.encrypt(
                _chunk_nonce(index, index == len(chunks) - 1), chunk, ref.encode()
            )
            parts.append(_LENGTH.pack(len(sealed)))
            parts.append(sealed)
        return b"".join(parts)

    def open(self, blob: bytes, ref: str) -> bytes:
        return b"".join(self._open_chunks(blob, ref))

    def _open_chunks(self, blob: bytes, ref: str) -> Iterator[bytes]:
        if blob[:4] != MAGIC or len(blob) < 4 + _WRAPPED_KEY:
            raise SealError(f"{ref}: not a sealed blob")
        wrapped = blob[4 : 4 + _WRAPPED_KEY]
        try:
            data_key = self._wrap.decrypt(
                wrapped[:_WRAP_NONCE], wrapped[_WRAP_NONCE:], b"cgw-data-key|" + ref.encode()
            )
        except InvalidTag:
            raise SealError(f"{ref}: wrong storage key, or the blob was changed") from None
        aead = AESGCM(data_key)
        offset, index = 4 + _WRAPPED_KEY, 0
        while True:
            if offset + _LENGTH.size > len(blob):
                raise SealError(f"{ref}: truncated")
            (length,) = _LENGTH.unpack_from(blob, offset)
            offset += _LENGTH.size
            sealed = blob[offset : offset + length]
            offset += length
            final = offset == len(blob)
            try:
                yield aead.decrypt(_chunk_nonce(index, final), sealed, ref.encode())
            except InvalidTag:
                raise SealError(f"{ref}: chunk {index} was changed or the blob truncated") from None
            if final:
                return
            index += 1


def _chunk_nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def storage_key(settings: Settings, create: bool = True) -> tuple[StorageKey, bool]:
    """This installation's storage key (``CGW_STORAGE_KEY``, else its key file)."""
    configured = settings.storage_key.get_secret_value() if settings.storage_key else None
    return load_or_create_key(settings.keys_dir / "storage.key", configured, create)


def load_or_create_key(
    path: Path, configured: str | None, create: bool = True
) -> tuple[StorageKey, bool]:
    """The storage key from the setting, else the key file (created once, 0600)."""
    raw, created = load_or_create_secret(path, configured, create)
    return StorageKey(raw), created


class MissingKey(SealError):
    """No key where one must already exist (the admin tools never make keys)."""


def load_or_create_secret(
    path: Path, configured: str | None, create: bool = True
) -> tuple[bytes, bool]:
    """32 secret bytes from a base64 setting, else from a key file created once (0600).

    Returns the bytes and whether a new file was created. An existing key file
    is never replaced: what was sealed or chained with it would be lost. With
    ``create=False`` a missing file is an error: an admin command run with the
    wrong data directory must not start a second key (and fork the audit chain).
    """
    if configured:
        return base64.b64decode(configured), False
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise SealError(f"key file {path} is damaged ({len(raw)} bytes, not 32)")
        return raw, False
    if not create:
        raise MissingKey(
            f"no key file {path}: run 'cgw init' with this CGW_DATA_DIR, or set the key "
            "setting (every instance and admin host sharing a database needs the same keys)"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    return raw, True

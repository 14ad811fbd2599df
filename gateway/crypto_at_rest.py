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
import io
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

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
        sealer = self.sealer(ref)
        return sealer.update(plaintext) + sealer.finish()

    def sealer(self, ref: str) -> Sealer:
        """A sealer for content that arrives in pieces (a message as DATA streams in)."""
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = secrets.token_bytes(_WRAP_NONCE)
        wrapped = nonce + self._wrap.encrypt(nonce, data_key, b"cgw-data-key|" + ref.encode())
        return Sealer(AESGCM(data_key), MAGIC + wrapped, ref)

    def open(self, blob: bytes, ref: str) -> bytes:
        return b"".join(self._open_chunks(io.BytesIO(blob), len(blob), ref))

    def open_file(self, path: Path, ref: str) -> bytes:
        """A sealed file's content, read a chunk at a time (never whole and sealed too)."""
        with path.open("rb") as stream:
            return b"".join(self._open_chunks(stream, os.fstat(stream.fileno()).st_size, ref))

    def _open_chunks(self, stream: BinaryIO, total: int, ref: str) -> Iterator[bytes]:
        head = stream.read(4 + _WRAPPED_KEY)
        if head[:4] != MAGIC or len(head) < 4 + _WRAPPED_KEY:
            raise SealError(f"{ref}: not a sealed blob")
        wrapped = head[4:]
        try:
            data_key = self._wrap.decrypt(
                wrapped[:_WRAP_NONCE], wrapped[_WRAP_NONCE:], b"cgw-data-key|" + ref.encode()
            )
        except InvalidTag:
            raise SealError(f"{ref}: wrong storage key, or the blob was changed") from None
        aead = AESGCM(data_key)
        offset, index = len(head), 0
        while True:
            if offset + _LENGTH.size > total:
                raise SealError(f"{ref}: truncated")
            (length,) = _LENGTH.unpack(stream.read(_LENGTH.size))
            sealed = stream.read(length)
            offset += _LENGTH.size + length
            final = offset == total
            try:
                yield aead.decrypt(_chunk_nonce(index, final), sealed, ref.encode())
            except InvalidTag:
                raise SealError(f"{ref}: chunk {index} was changed or the blob truncated") from None
            if final:
                return
            index += 1


class Sealer:
    """Seals content piece by piece into the same format as ``StorageKey.seal``.

    Only whole chunks leave, and the newest one is held back until more
    content (or ``finish``) says whether it is the last: the final chunk must
    be marked as such. Memory stays at about two chunks whatever the size.
    """

    def __init__(self, aead: AESGCM, preamble: bytes, ref: str) -> None:
        self._aead = aead
        self._pending = bytearray(preamble)  # sealed bytes not yet handed out
        self._plain = bytearray()
        self._ref = ref.encode()
        self._index = 0

    def update(self, data: bytes) -> bytes:
        """Sealed bytes ready to be written (often none)."""
        self._plain += data
        whole = (len(self._plain) - 1) // CHUNK_SIZE * CHUNK_SIZE
        if whole > 0:
            with memoryview(self._plain) as view:
                for start in range(0, whole, CHUNK_SIZE):
                    self._seal(view[start : start + CHUNK_SIZE], final=False)
            del self._plain[:whole]
        return self._take()

    def finish(self) -> bytes:
        """The rest, ending with the chunk marked final."""
        self._seal(bytes(self._plain), final=True)
        self._plain.clear()
        return self._take()

    def _seal(self, chunk: bytes | memoryview, final: bool) -> None:
        sealed = self._aead.encrypt(_chunk_nonce(self._index, final), chunk, self._ref)
        self._pending += _LENGTH.pack(len(sealed)) + sealed
        self._index += 1

    def _take(self) -> bytes:
        out = bytes(self._pending)
        self._pending.clear()
        return out


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

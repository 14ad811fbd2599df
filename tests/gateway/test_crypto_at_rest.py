"""Encryption at rest (gateway.crypto_at_rest): sealing, tamper detection, key files."""

from __future__ import annotations

import base64
import os
import stat
import struct
from pathlib import Path

import pytest

from gateway.crypto_at_rest import (
    CHUNK_SIZE,
    MAGIC,
    SealError,
    StorageKey,
    load_or_create_key,
)

KEY = StorageKey(bytes(range(32)))
OTHER_KEY = StorageKey(bytes(range(1, 33)))
REF = "20250301T120000Z-abcdef"
HEADER = len(MAGIC) + 12 + 32 + 16  # magic, wrapped data key
TAG = 16
LENGTH = struct.Struct(">I")


def _pattern(size: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(size))


def _chunks(blob: bytes) -> list[bytes]:
    """Split a sealed blob into its length-prefixed chunk records."""
    records, offset = [], HEADER
    while offset < len(blob):
        (length,) = LENGTH.unpack_from(blob, offset)
        records.append(blob[offset : offset + LENGTH.size + length])
        offset += LENGTH.size + length
    assert offset == len(blob)
    return records


SIZES = {
    "empty": 0,
    "small": 1234,
    "one-chunk": CHUNK_SIZE,
    "chunk-plus-one": CHUNK_SIZE + 1,
    "two-and-a-half-chunks": CHUNK_SIZE * 5 // 2,
}


@pytest.fixture(scope="module")
def sealed() -> dict[str, tuple[bytes, bytes]]:
    """Plaintext and blob for every size, sealed once per module."""
    result = {}
    for name, size in SIZES.items():
        plaintext = _pattern(size)
        result[name] = (plaintext, KEY.seal(plaintext, REF))
    return result


@pytest.mark.parametrize(
    ("name", "chunk_count"),
    [
        ("empty", 1),
        ("small", 1),
        ("one-chunk", 1),
        ("chunk-plus-one", 2),
        ("two-and-a-half-chunks", 3),
    ],
)
def test_round_trip(sealed: dict[str, tuple[bytes, bytes]], name: str, chunk_count: int) -> None:
    plaintext, blob = sealed[name]
    assert blob.startswith(MAGIC)
    assert len(blob) == HEADER + len(plaintext) + chunk_count * (LENGTH.size + TAG)
    assert len(_chunks(blob)) == chunk_count
    assert KEY.open(blob, REF) == plaintext


def test_sealed_blob_does_not_contain_the_plaintext() -> None:
    plaintext = b"Diagnosis: patient Anna Example, born 1970-01-01. " * 40
    blob = KEY.seal(plaintext, REF)
    assert plaintext not in blob
    assert b"Diagnosis" not in blob
    assert b"Anna Example" not in blob


def test_sealing_twice_gives_different_blobs() -> None:
    assert KEY.seal(b"same", REF) != KEY.seal(b"same", REF)


def test_wrong_ref_is_refused(sealed: dict[str, tuple[bytes, bytes]]) -> None:
    _, blob = sealed["small"]
    with pytest.raises(SealError, match="wrong storage key, or the blob was changed"):
        KEY.open(blob, REF + "x")


def test_wrong_key_is_refused(sealed: dict[str, tuple[bytes, bytes]]) -> None:
    _, blob = sealed["small"]
    with pytest.raises(SealError, match="wrong storage key"):
        OTHER_KEY.open(blob, REF)


def test_every_flipped_byte_is_detected() -> None:
    blob = KEY.seal(b"short message body\r\n", REF)
    for position in range(len(blob)):
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        with pytest.raises(SealError):
            KEY.open(bytes(damaged), REF)


@pytest.mark.parametrize("where", ["magic", "wrapped-key", "length", "first-chunk", "last-chunk"])
def test_flipped_byte_in_large_blob_is_detected(
    sealed: dict[str, tuple[bytes, bytes]], where: str
) -> None:
    _, blob = sealed["two-and-a-half-chunks"]
    position = {
        "magic": 0,
        "wrapped-key": HEADER - 1,
        "length": HEADER + 2,
        "first-chunk": HEADER + LENGTH.size + CHUNK_SIZE // 2,
        "last-chunk": len(blob) - 1,
    }[where]
    damaged = bytearray(blob)
    damaged[position] ^= 0x80
    with pytest.raises(SealError):
        KEY.open(bytes(damaged), REF)


@pytest.mark.parametrize(
    "cut",
    [0, 3, 4, HEADER - 1, HEADER, HEADER + 2, HEADER + LENGTH.size, HEADER + 100],
)
def test_truncated_small_blob_is_refused(cut: int) -> None:
    blob = KEY.seal(_pattern(500), REF)
    with pytest.raises(SealError):
        KEY.open(blob[:cut], REF)


def test_truncated_by_one_byte_is_refused(sealed: dict[str, tuple[bytes, bytes]]) -> None:
    _, blob = sealed["two-and-a-half-chunks"]
    with pytest.raises(SealError):
        KEY.open(blob[:-1], REF)


@pytest.mark.parametrize("dropped", [1, 2])
def test_truncated_at_a_chunk_boundary_is_refused(
    sealed: dict[str, tuple[bytes, bytes]], dropped: int
) -> None:
    _, blob = sealed["two-and-a-half-chunks"]
    records = _chunks(blob)
    shortened = blob[:HEADER] + b"".join(records[:-dropped])
    assert len(shortened) < len(blob)
    with pytest.raises(SealError, match="chunk"):
        KEY.open(shortened, REF)


def test_trailing_garbage_is_refused(sealed: dict[str, tuple[bytes, bytes]]) -> None:
    _, blob = sealed["small"]
    with pytest.raises(SealError):
        KEY.open(blob + LENGTH.pack(0), REF)


@pytest.mark.parametrize(("first", "second"), [(0, 1), (1, 2), (0, 2)])
def test_swapped_chunks_are_refused(
    sealed: dict[str, tuple[bytes, bytes]], first: int, second: int
) -> None:
    _, blob = sealed["two-and-a-half-chunks"]
    records = _chunks(blob)
    records[first], records[second] = records[second], records[first]
    with pytest.raises(SealError):
        KEY.open(blob[:HEADER] + b"".join(records), REF)


def test_chunk_from_another_blob_is_refused() -> None:
    first = KEY.seal(_pattern(CHUNK_SIZE + 10), REF)
    second = KEY.seal(_pattern(CHUNK_SIZE + 10), REF)
    spliced = first[:HEADER] + _chunks(first)[0] + _chunks(second)[1]
    with pytest.raises(SealError):
        KEY.open(spliced, REF)


def test_not_a_sealed_blob() -> None:
    with pytest.raises(SealError, match="not a sealed blob"):
        KEY.open(b"From: someone\r\n\r\nplain text\r\n" * 5, REF)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_storage_key_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        StorageKey(bytes(length))


# --- key file ---------------------------------------------------------------------------------


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys" / "storage.key"
    key, created = load_or_create_key(path, None)
    assert created is True
    raw = path.read_bytes()
    assert len(raw) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = key.seal(b"kept", REF)

    again, created_again = load_or_create_key(path, None)
    assert created_again is False
    assert path.read_bytes() == raw  # never replaced
    assert again.open(blob, REF) == b"kept"


def test_key_directory_is_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "storage.key"
    load_or_create_key(path, None)
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0


def test_two_created_keys_differ(tmp_path: Path) -> None:
    load_or_create_key(tmp_path / "a.key", None)
    load_or_create_key(tmp_path / "b.key", None)
    assert (tmp_path / "a.key").read_bytes() != (tmp_path / "b.key").read_bytes()


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_damaged_key_file_is_refused(tmp_path: Path, length: int) -> None:
    path = tmp_path / "storage.key"
    path.write_bytes(os.urandom(length))
    with pytest.raises(SealError, match=f"damaged \\({length} bytes, not 32\\)"):
        load_or_create_key(path, None)
    assert len(path.read_bytes()) == length  # left alone


def test_configured_key_is_used_without_touching_the_file(tmp_path: Path) -> None:
    raw = bytes(range(100, 132))
    configured = base64.b64encode(raw).decode()
    missing = tmp_path / "keys" / "storage.key"
    key, created = load_or_create_key(missing, configured)
    assert created is False
    assert not missing.exists()
    assert not missing.parent.exists()
    assert StorageKey(raw).open(key.seal(b"x", REF), REF) == b"x"


def test_configured_key_wins_over_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "storage.key"
    path.write_bytes(bytes(32))
    before = path.stat()
    raw = bytes(range(200, 232))
    key, created = load_or_create_key(path, base64.b64encode(raw).decode())
    assert created is False
    assert path.read_bytes() == bytes(32)
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    blob = key.seal(b"y", REF)
    assert StorageKey(raw).open(blob, REF) == b"y"
    with pytest.raises(SealError):
        StorageKey(bytes(32)).open(blob, REF)

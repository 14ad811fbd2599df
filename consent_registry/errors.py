"""Errors the registry raises; their messages are shown to the admin as they are."""

from __future__ import annotations


class RegistryError(Exception):
    """Bad input, or a change the record does not allow. Nothing was written."""


class NotFoundError(RegistryError):
    """The record named does not exist."""

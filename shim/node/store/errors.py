"""The store's errors: one base (StoreError) and what a caller tells apart."""

from __future__ import annotations

from thaw.oci import ThawError


class StoreError(ThawError):
    pass


class SnapshotNotFound(StoreError):
    pass


class CorruptSnapshot(StoreError):
    pass


class QuotaExceeded(StoreError):
    """A capture, import or pull would take its namespace past its quota (or the store past
    store.max_bytes), and nothing more of that namespace may be evicted."""

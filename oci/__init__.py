"""OCI formats: runtime-spec bundles, container state, runc argv, image layouts, thaw's snapshot
artifact. Nothing in this package runs a process or knows how runc behaves.

`ThawError` is the base of every error thaw reports; it lives here because every module (and the
runtime's hot path, which imports this package anyway) can reach it without another import.
"""


class ThawError(Exception):
    """Something thaw cannot do, with a message fit for an operator (no traceback needed)."""

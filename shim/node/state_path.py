"""Where a container's record lives: all that the runtime's start and delete of every container
need to tell whether thaw handles it (one stat). The record itself: shim/node/state.py."""

from __future__ import annotations

import os

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


def valid_id(container_id: str) -> bool:
    """Container ids become file names here: the alphabet runc accepts, no leading dot."""
    return (0 < len(container_id) <= 1024 and container_id[0] != "." and
            _ID_CHARS.issuperset(container_id))


def record_path(state_dir: str, container_id: str) -> str:
    """Raises ValueError for an id that cannot be a file name."""
    if not valid_id(container_id):
        raise ValueError(f"invalid container id {container_id!r}")
    return os.path.join(state_dir, "containers", container_id + ".json")

"""The OCI container state, as a runtime passes it to hooks on stdin (and `runc state` prints)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO

from . import ThawError


class StateError(ThawError):
    """The input is not an OCI container state."""


@dataclass
class OciState:
    id: str
    status: str
    pid: int | None
    bundle: str
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: str | bytes) -> OciState:
        try:
            obj = json.loads(data)
            return cls(id=str(obj["id"]), status=str(obj.get("status", "")),
                       pid=int(obj["pid"]) if obj.get("pid") else None,
                       bundle=str(obj.get("bundle", "")),
                       annotations=dict(obj.get("annotations") or {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"not an OCI container state: {exc}") from exc

    @classmethod
    def read(cls, stream: IO[bytes]) -> OciState:
        return cls.from_json(stream.read())

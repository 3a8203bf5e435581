"""cosign's classic key-based signature format (sigstore/cosign specs/SIGNATURE_SPEC.md), the
form `cosign sign --key` writes and `cosign verify --key` reads; formats only, no crypto.

A signature of manifest sha256:<hex> in repository REGISTRY/REPO is an OCI image manifest stored
in that same repository under the tag `sha256-<hex>.sig`. Each of its layers is one signature:
the layer blob is the simple-signing payload (JSON naming the repository and the digest), its
annotation `dev.cosignproject.cosign/signature` the base64 ECDSA P-256 / SHA-256 signature of
those exact payload bytes. Signing again adds a layer (cosign does the same).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from .digest import of_bytes
from .layout import LayoutError
from .reference import check_digest

PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MAX_PAYLOAD = 64 << 10          # a payload is a few hundred bytes
MAX_SIGNATURES = 32             # layers of one .sig manifest that are looked at
_TAG = re.compile(r"^sha256-([0-9a-f]{64})\.sig$")


class SignatureFormatError(LayoutError):
    """A signature manifest or payload is not cosign's simple-signing form."""


def tag_for(digest: str) -> str:
    """The tag cosign stores the signatures of manifest `digest` under."""
    return check_digest(digest, error=LayoutError).replace(":", "-", 1) + ".sig"


def digest_of_tag(tag: str) -> str | None:
    """The manifest digest a `sha256-<hex>.sig` tag signs; None for any other name."""
    m = _TAG.match(tag)
    return f"sha256:{m.group(1)}" if m else None


def payload(repository: str, digest: str) -> bytes:
    """The simple-signing payload for manifest `digest` of REGISTRY/REPO `repository`."""
    return json.dumps({"critical": {"identity": {"docker-reference": repository},
                                    "image": {"docker-manifest-digest": check_digest(digest, error=LayoutError)},
                                    "type": PAYLOAD_TYPE},
                       "optional": None}).encode()


@dataclass(frozen=True)
class Claim:
    """What a payload says it signs."""
    repository: str
    digest: str


def read_payload(data: bytes) -> Claim:
    try:
        obj = json.loads(data)
        critical = obj["critical"]
        if critical["type"] != PAYLOAD_TYPE:
            raise SignatureFormatError(f"payload type is {critical['type']!r}, not {PAYLOAD_TYPE!r}")
        repository = critical["identity"]["docker-reference"]
        digest = critical["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureFormatError(f"not a simple-signing payload: {exc}") from exc
    if not isinstance(repository, str) or not isinstance(digest, str):
        raise SignatureFormatError("payload identity or digest is not a string")
    return Claim(repository, digest)


@dataclass(frozen=True)
class Signature:
    """One signature: the payload bytes and the raw signature over them (DER ECDSA)."""
    payload: bytes
    signature: bytes

    def to_json(self) -> dict[str, str]:
        return {"payload": base64.b64encode(self.payload).decode(),
                "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Signature:
        try:
            return cls(base64.b64decode(obj["payload"], validate=True),
                       base64.b64decode(obj["signature"], validate=True))
        except (KeyError, TypeError, binascii.Error) as exc:
            raise SignatureFormatError(f"malformed signature record: {exc}") from exc

    @property
    def payload_digest(self) -> str:
        return of_bytes(self.payload)


def _descriptor(media_type: str, data: bytes, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    d = {"mediaType": media_type, "size": len(data), "digest": of_bytes(data)}
    if annotations:
        d["annotations"] = annotations
    return d


def config_blob(diff_ids: list[str]) -> bytes:
    """The image config cosign writes beside its signature layers (diff_ids: the payloads)."""
    return json.dumps({"architecture": "", "created": "0001-01-01T00:00:00Z",
                       "history": [{"created": "0001-01-01T00:00:00Z"} for _ in diff_ids],
                       "os": "", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                       "config": {}}).encode()


def manifest(signatures: list[Signature], existing: bytes | None = None) -> tuple[bytes, dict[str, bytes]]:
    """The .sig manifest carrying `signatures` after the layers of `existing` (a .sig manifest
    already stored: its layers are kept as they are, annotations and all), and the blobs to store
    with it by digest (its config and the new payloads)."""
    layers: list[dict[str, Any]] = []
    if existing is not None:
        try:
            layers = [d for d in json.loads(existing).get("layers") or [] if isinstance(d, dict)]
        except (ValueError, AttributeError):
            layers = []
    blobs: dict[str, bytes] = {}
    for s in signatures:
        layer = _descriptor(PAYLOAD_MEDIA_TYPE, s.payload, {SIGNATURE_ANNOTATION: base64.b64encode(s.signature).decode()})
        if layer not in layers:
            layers.append(layer)
            blobs[s.payload_digest] = s.payload
    config = config_blob([str(d.get("digest")) for d in layers])
    blobs[of_bytes(config)] = config
    body = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": _descriptor(CONFIG_MEDIA_TYPE, config), "layers": layers}
    return json.dumps(body).encode(), blobs


@dataclass(frozen=True)
class SignatureLayer:
    """One layer of a .sig manifest: its payload blob (to fetch and check against the digest)
    and the signature from its annotation."""
    payload_digest: str
    payload_size: int
    signature: bytes


def signature_layers(data: bytes) -> list[SignatureLayer]:
    """The simple-signing layers of a .sig manifest (others ignored; at most MAX_SIGNATURES)."""
    try:
        obj = json.loads(data)
        layers = obj.get("layers") or []
        if not isinstance(layers, list):
            raise SignatureFormatError("layers is not a list")
    except (ValueError, AttributeError) as exc:
        raise SignatureFormatError(f"signature manifest is malformed: {exc}") from exc
    out = []
    for layer in layers[:MAX_SIGNATURES]:
        if not isinstance(layer, dict) or layer.get("mediaType") != PAYLOAD_MEDIA_TYPE:
            continue
        sig = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
        size = layer.get("size")
        if not isinstance(sig, str) or not isinstance(size, int) or not 0 < size <= MAX_PAYLOAD:
            continue
        try:
            out.append(SignatureLayer(check_digest(str(layer.get("digest")), error=LayoutError), size,
                                      base64.b64decode(sig, validate=True)))
        except (binascii.Error, LayoutError):
            continue
    return out

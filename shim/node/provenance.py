"""Where a snapshot came from, and whether this node may restore it.

CRIU images are root-level instructions (credentials, files and sockets made as root, AppArmor
policy, rlimits...), so a node restores only snapshots it captured itself, or that a key it
trusts signed for the repository they came from, or — where the node config says so explicitly
(trust.unsigned) — unsigned ones from a named source. The store records each snapshot's
provenance when it is published (index annotation dev.thaw.provenance):

  captured   captured on this node
  signed     a cosign signature verified at pull or import: key id (sha256 of the public key's
             DER), the repository it was signed for, when it was verified
  unsigned   accepted without a trusted signature by trust.unsigned: the source (REGISTRY/REPO,
             "import", "thaw-0.1")

The restore check asks again under the config of the moment: a key removed from trust.keys, or a
source removed from trust.unsigned, stops restores of what it let in.

Stores from before provenance (no dev.thaw.provenance): the origin this node's store recorded
decides — "captured" is captured; "pulled:REF", "imported" and "migrated" are unsigned from that
source, refused unless trust.unsigned names it. A migration by reading, no silent trust.

Signatures are cosign's key-based form (oci/cosign.py); the crypto is the `cryptography`
library's ECDSA P-256 / SHA-256, imported only where a signature is made or checked.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from thaw.oci import ThawError, cosign
from thaw.oci.annotations import SnapshotRef
from thaw.oci.digest import of_bytes

from ..safetext import printable
from . import events
from .config import Config
from .config_schema import UNSIGNED_IMPORT, UNSIGNED_THAW_0_1

if TYPE_CHECKING:  # cryptography is imported where a key is used, not with this module
    from cryptography.hazmat.primitives.asymmetric import ec

CAPTURED, SIGNED, UNSIGNED = "captured", "signed", "unsigned"


class ProvenanceError(ThawError):
    """A key file cannot be read or is not an ECDSA P-256 key."""


class Untrusted(ProvenanceError):
    """A snapshot lacks the provenance this node requires (the message says what it has)."""


@dataclass(frozen=True)
class Provenance:
    kind: str                # CAPTURED, SIGNED or UNSIGNED
    source: str = ""         # SIGNED: the repository signed for; UNSIGNED: REGISTRY/REPO, "import", "thaw-0.1"
    key: str = ""            # SIGNED: the key id
    time: str = ""           # when it was verified or accepted

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in (("kind", self.kind), ("source", self.source), ("key", self.key),
                                  ("time", self.time)) if v}

    @classmethod
    def from_json(cls, obj: object) -> Provenance:
        if not isinstance(obj, dict) or obj.get("kind") not in (CAPTURED, SIGNED, UNSIGNED) \
                or not all(isinstance(v, str) for v in obj.values()):
            return cls(UNSIGNED, "unknown")
        return cls(obj["kind"], obj.get("source", ""), obj.get("key", ""), obj.get("time", ""))

    def describe(self) -> str:
        if self.kind == CAPTURED:
            return "captured here"
        if self.kind == SIGNED:
            return f"signed by key {self.key[:19]} for {self.source} (verified {self.time})"
        return f"unsigned from {self.source}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def from_origin(origin: str) -> Provenance:
    """The provenance of an index entry that records none (published before provenance existed),
    read from the origin the node's store recorded."""
    if origin == "captured":
        return Provenance(CAPTURED)
    if origin.startswith("pulled:"):
        return Provenance(UNSIGNED, repository_of(origin[len("pulled:"):]))
    if origin == "imported":
        return Provenance(UNSIGNED, UNSIGNED_IMPORT)
    if origin == "migrated":
        return Provenance(UNSIGNED, UNSIGNED_THAW_0_1)
    return Provenance(UNSIGNED, "unknown")


def repository_of(reference: str) -> str:
    """REGISTRY/REPO of a registry reference (tag or digest dropped)."""
    try:
        remote = SnapshotRef.registry(reference).remote
    except ThawError:
        return "unknown"
    return f"{remote.registry}/{remote.repository}" if remote is not None else "unknown"


# --- keys --------------------------------------------------------------------------------------

def _pem_der(pem: bytes) -> bytes:
    lines = [ln.strip() for ln in pem.decode("ascii", "replace").splitlines()]
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("-----BEGIN "))
        end = next(i for i, ln in enumerate(lines) if i > start and ln.startswith("-----END "))
        return base64.b64decode("".join(lines[start + 1:end]), validate=True)
    except (StopIteration, ValueError) as exc:
        raise ProvenanceError(f"not a PEM file: {exc}") from exc


def key_id(pem: bytes) -> str:
    """sha256 of the public key's DER (SubjectPublicKeyInfo): what provenance records."""
    return of_bytes(_pem_der(pem))


def trusted_key_ids(cfg: Config, repository: str) -> dict[str, str]:
    """key id -> key file of the keys trust.keys trusts for `repository` (unreadable files are
    not trusted: `thaw doctor` reports them)."""
    out = {}
    for path in cfg.trust.keys_for(repository):
        try:
            with open(path, "rb") as f:
                out[key_id(f.read())] = path
        except (OSError, ProvenanceError):
            continue
    return out


def _public_key(path: str) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    try:
        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"public key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ProvenanceError(f"public key {path} is not an ECDSA P-256 key")
    return key


def check_public_key(path: str) -> str:
    """The key id of a usable public key file (ProvenanceError if it is not one)."""
    _public_key(path)
    with open(path, "rb") as f:
        return key_id(f.read())


def _private_key(path: str) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    try:
        with open(path, "rb") as f:
            key = load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ProvenanceError(f"signing key {path}: {exc} (thaw reads unencrypted PEM keys: "
                        "`thaw key generate`)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ProvenanceError(f"signing key {path} is not an ECDSA P-256 key")
    return key


def generate(directory: str, name: str = "thaw") -> tuple[str, str, str]:
    """A new ECDSA P-256 key pair: DIR/NAME.key (PKCS#8 PEM, 0600) and DIR/NAME.pub (the public
    key cosign and trust.keys read). Returns (private path, public path, key id)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path, pub_path = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.pub")
    for path, data, mode in ((key_path, private, 0o600), (pub_path, public, 0o644)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return key_path, pub_path, key_id(public)


# --- signing and verifying ---------------------------------------------------------------------

def sign(cfg: Config, repository: str, digest: str) -> cosign.Signature:
    """A cosign signature of manifest `digest` for REGISTRY/REPO `repository`, made with
    trust.signing_key."""
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    data = cosign.payload(repository, digest)
    return cosign.Signature(data, signing_key(cfg).sign(data, ec.ECDSA(hashes.SHA256())))


def signing_key(cfg: Config) -> ec.EllipticCurvePrivateKey:
    """trust.signing_key, loaded (ProvenanceError if unset or unusable)."""
    if not cfg.trust.signing_key:
        raise ProvenanceError("no signing key: set trust.signing_key in the node config (`thaw key generate`)")
    return _private_key(cfg.trust.signing_key)


def _verifies(path: str, sig: cosign.Signature) -> bool:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - ~30 ms to import; only where a signature is made or checked
    try:
        _public_key(path).verify(sig.signature, sig.payload, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ProvenanceError):
        return False


def verify(cfg: Config, digest: str, signatures: list[cosign.Signature], repository: str | None,
           unsigned_source: str, what: str) -> tuple[Provenance, list[cosign.Signature]]:
    """The provenance of manifest `digest` from the signatures that came with it, and those of
    them that verified. repository: REGISTRY/REPO it was pulled from (a signature must name it);
    None for an import (a signature names its repository; the keys trusted for that one decide).
    Without a trusted signature: unsigned from `unsigned_source` if trust.unsigned accepts it,
    else Untrusted naming why each signature failed."""
    why: list[str] = []
    good: list[cosign.Signature] = []
    key = claimed = ""
    for sig in signatures:
        try:
            claim = cosign.read_payload(sig.payload)
        except cosign.SignatureFormatError as exc:
            why.append(printable(exc, 200))
            continue
        # What a payload names came from the registry or archive: quoted printable and capped.
        named, named_digest = printable(claim.repository, 200), printable(claim.digest, 80)
        if claim.digest != digest:
            why.append(f"a signature is for {named_digest}, not {digest}")
            continue
        if repository is not None and claim.repository != repository:
            why.append(f"a signature names repository {named}, not {repository} "
                       "(a signature copied from another repository)")
            continue
        keys = trusted_key_ids(cfg, claim.repository)
        if not keys:
            why.append(f"no key is trusted for {named} (trust.keys)")
            continue
        ok = [kid for kid, path in keys.items() if _verifies(path, sig)]
        if not ok:
            why.append(f"a signature for {named} verifies with none of the {len(keys)} key(s) "
                       "trust.keys names for it")
            continue
        good.append(sig)
        key, claimed = key or ok[0], claimed or claim.repository
    if good:
        return Provenance(SIGNED, claimed, key, now()), good
    if cfg.trust.accepts_unsigned(unsigned_source):
        return Provenance(UNSIGNED, unsigned_source, "", now()), []
    found = "; ".join(dict.fromkeys(why)) if why else "it carries no signature"
    raise Untrusted(f"{what} has no signature this node trusts: {found} (trust.keys; unsigned snapshots "
                    f"from {unsigned_source} only with trust.unsigned)")


def check_restorable(cfg: Config, prov: Provenance, what: str) -> None:
    """May a snapshot of provenance `prov` be restored under the node config of the moment?"""
    if prov.kind == CAPTURED:
        return
    if prov.kind == SIGNED:
        if prov.key in trusted_key_ids(cfg, prov.source):
            return
        raise Untrusted(f"{what} was signed by key {prov.key[:19]}, which trust.keys no longer trusts for "
                        f"{prov.source} (revoked or rotated out)")
    if cfg.trust.accepts_unsigned(prov.source):
        return
    raise Untrusted(f"{what} has no provenance this node trusts: unsigned, from {prov.source} "
                    f"(restored only when signed by a key in trust.keys, or with {prov.source} in trust.unsigned)")


def report_refusal(cfg: Config, exc: ThawError, **fields: str) -> None:
    """The events log entry of a pull or import refused for provenance."""
    events.emit(cfg, "untrusted", str(exc), None, "warning", reason=str(exc), **fields)


def signatures_json(signatures: list[cosign.Signature]) -> str:
    return json.dumps([s.to_json() for s in signatures])


def signatures_from_json(text: str) -> list[cosign.Signature]:
    try:
        return [cosign.Signature.from_json(o) for o in json.loads(text or "[]")]
    except (ValueError, TypeError, cosign.SignatureFormatError):
        return []

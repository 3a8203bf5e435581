"""Snapshots through OCI registries: push a published snapshot, pull one into the store.

What is pushed is the stored snapshot as it is — its manifest (artifactType
application/vnd.thaw.snapshot.v1, the same bytes, so the same digest everywhere), config, the CRIU
whole-file tar, each file part (a byte range of a CRIU image file, read in place), the rootfs diff
and the deleted list. A pull is the reverse, into the store's one copy: file parts are written
straight into the CRIU files at their offsets (several in parallel), every blob verified while it
streams; the snapshot is published only when all of them are.

A pull in progress lives in the store's pull area for its manifest (Store.pull_area: the CRIU
files being filled, the small blobs, a journal of resume points). A pull killed and run again
before a gc resumes from the journal; a second pull of the same manifest waits for the first.
A pull that fails removes its area at once, and gc removes one whose process is gone: space is
taken only as bytes arrive, within what the namespace's quota let the pull claim.

Provenance (shim/node/provenance.py): a pull fetches the cosign signatures stored beside the manifest
(`sha256-<hex>.sig` in the same repository) right after the manifest, and verifies them against
the keys trust.keys names for that repository — the payload must name this digest and this
repository — before any blob is fetched; without a trusted signature the pull is refused unless
trust.unsigned accepts the repository. `thaw push --sign` adds a signature made with
trust.signing_key.

The owner of a pulled snapshot is decided by the node, never read from the snapshot: a pull made
for a pod (pull on demand) belongs to the pod's namespace, and only repositories the node policy
(registry.pull) lets that namespace pull from are pulled; a pull by an operator belongs to the
namespace named (`-n`), else the one namespace registry.pull lets pull that repository.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, ParamSpec, TypeVar

from thaw.oci import ThawError, cosign
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.files import make_private_dir
from thaw.oci.layout import Descriptor, LayoutError
from thaw.oci.reference import Reference

from .. import faults, safetext
from ..node import events, provenance
from ..node.config import Config
from ..node.store import Store, StoreError
from ..registry import errors, transfer
from ..registry.blobs import BlobRange
from ..registry.client import RegistryClient
from ..registry.errors import LocalFileError, NotFoundError, RegistryError
from ..registry.transport import Settings
from ..timing import Stopwatch

_P = ParamSpec("_P")
_T = TypeVar("_T")

SPACE_MARGIN = 256 << 20       # a pull leaves at least this much free on the store's disk

Listener = Callable[[str, Any, Any], None]


class DistributionError(ThawError):
    """A push or pull failed; the message names the registry, repository and what went wrong."""


class PullRefused(DistributionError):
    """Node policy does not let this namespace pull this reference (or read what it names)."""


def settings(cfg: Config) -> Settings:
    reg = cfg.registry
    return Settings(auth_config=reg.auth_file or None, ca_bundle=reg.ca_file or None,
                    insecure_hosts=tuple(reg.insecure))


@contextlib.contextmanager
def _client(cfg: Config, registry: str) -> Iterator[Any]:
    try:
        with RegistryClient(registry, settings(cfg)) as client:
            yield client
    except RegistryError as exc:
        raise DistributionError(str(exc)) from exc


def target_of(ref: SnapshotRef, to: str | None) -> Reference:
    """Where `thaw push` sends `ref`: the given reference, else the snapshot's own name if that
    is a registry reference. Pushed by tag (a digest is what the registry computes)."""
    text = to or (str(ref) if ref.remote is not None else None)
    if text is None:
        raise DistributionError(f"{ref} is not a registry reference: name one (thaw push NAME REGISTRY/REPO:TAG)")
    target = SnapshotRef.registry(text).remote
    assert target is not None  # registry() always sets it
    if target.digest:
        raise DistributionError(f"push to a tag, not a digest: {text}")
    return target


# --- push --------------------------------------------------------------------------------------------

def push(cfg: Config, store: Store, ref: SnapshotRef, namespace: str, target: Reference,
         listener: Listener | None = None, sign: bool = False) -> dict[str, Any]:
    """Upload snapshot `ref` of `namespace` to `target` (blobs the registry has are skipped),
    then its manifest under target's tag; the store notes where it was pushed. sign: also store
    a cosign signature of the manifest for target's repository (trust.signing_key)."""
    snap = store.resolve(ref, namespace)
    if sign:
        provenance.signing_key(cfg)                  # a missing or bad key fails before any upload
    manifest = store.layout.read_blob(snap.manifest, fmt.MAX_META)
    with store.image_dir(snap) as images:           # held: no rm or gc takes it mid-upload
        blobs = [BlobRange(d.digest, store.layout.blob_path(d.digest), 0, d.size)
                 for d in (snap.config_desc, snap.criu_whole, snap.rootfs, snap.deleted)]
        blobs += [BlobRange(p.desc.digest, os.path.join(images, p.file), p.offset, p.desc.size)
                  for p in snap.parts]
        with _client(cfg, target.registry) as client:
            progress = _registry_call(transfer.push_blobs, client, target.repository, blobs, listener=listener,
                                      mount_from=_mount_sources(store, snap, target))
            digest = _registry_call(client.put_manifest, target.repository, target.tag or "latest", manifest,
                                    fmt.MANIFEST_MEDIA_TYPE)
            signature = _sign(cfg, client, target, digest) if sign else None
    store.mark_pushed(snap, str(target))
    if signature is not None:
        store.add_signature(snap, signature)
    skipped = sum(1 for b in progress.blobs.values() if b.outcome in ("present", "mounted"))
    return {"snapshot": str(ref), "namespace": snap.namespace, "reference": str(target), "digest": digest,
            "bytes": snap.size, "blobs": len(progress.blobs), "skipped": skipped,
            "seconds": round(progress.elapsed(), 3), "signed": signature is not None}


def _sign(cfg: Config, client: RegistryClient, target: Reference, digest: str) -> cosign.Signature:
    """Sign manifest `digest` for target's repository and store the signature where cosign looks
    (appended to the signatures already there)."""
    signature = provenance.sign(cfg, f"{target.registry}/{target.repository}", digest)
    tag = cosign.tag_for(digest)
    try:
        existing: bytes | None = client.get_manifest(target.repository, tag, (cosign.MANIFEST_MEDIA_TYPE,)).data
    except NotFoundError:
        existing = None
    data, blobs = cosign.manifest([signature], existing)
    for digest_, blob in blobs.items():
        _registry_call(client.push_bytes, target.repository, blob, digest_)
    _registry_call(client.put_manifest, target.repository, tag, data, cosign.MANIFEST_MEDIA_TYPE)
    return signature


def _fetch_signatures(client: RegistryClient, repository: str, sig_manifest: bytes) -> list[cosign.Signature]:
    """The signatures of a .sig manifest, each payload fetched and checked against its digest."""
    out = []
    for layer in cosign.signature_layers(sig_manifest):
        data = _registry_call(client.fetch_bytes, repository, layer.payload_digest, cosign.MAX_PAYLOAD)
        out.append(cosign.Signature(data, layer.signature))
    return out


def signatures_of(client: RegistryClient, repository: str, digest: str) -> list[cosign.Signature]:
    """The cosign signatures a repository holds for manifest `digest` (none: an empty list)."""
    try:
        got = client.get_manifest(repository, cosign.tag_for(digest), (cosign.MANIFEST_MEDIA_TYPE,))
    except NotFoundError:
        return []
    except RegistryError as exc:
        raise DistributionError(str(exc)) from exc
    try:
        return _fetch_signatures(client, repository, got.data)
    except cosign.SignatureFormatError:
        return []


def _mount_sources(store: Store, snap: fmt.Snapshot, target: Reference) -> tuple[str, ...]:
    """Repositories of the target's registry that hold this snapshot's blobs (where it was pulled
    from or pushed to): the registry may mount them instead of taking an upload."""
    out = []
    for mark in (store.origin(snap).removeprefix("pulled:"), store.pushed(snap) or ""):
        if "/" not in mark:
            continue
        try:
            ref = SnapshotRef.registry(mark).remote
        except ThawError:
            continue
        assert ref is not None  # registry() always sets it
        if ref.registry == target.registry and ref.repository != target.repository:
            out.append(ref.repository)
    return tuple(dict.fromkeys(out))


def _registry_call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    try:
        return fn(*args, **kwargs)
    except errors.RegistryError as exc:
        hint = next((h for kind, h in _REGISTRY_HINTS if isinstance(exc, getattr(errors, kind))), "")
        raise DistributionError(f"{exc}{hint}") from exc


# What to do about each kind of registry failure (LocalFileError: distribution._describe says).
_REGISTRY_HINTS = (
    ("NetworkError", " (check that this node reaches the registry, then try again)"),
    ("AuthError", " (check the credentials in registry.auth_file and what they may access)"),
    ("NotFoundError", " (check the reference: registry, repository and tag)"),
    ("DigestMismatchError", " (the registry served other bytes than the manifest names; none were kept)"),
    ("RegistryConfigError", " (see registry.insecure / registry.ca_file / registry.auth_file in the node config)"),
)


# --- pull --------------------------------------------------------------------------------------------

def owner_for(cfg: Config, source: Reference, for_namespace: str | None, owner: str | None) -> str:
    """Who will own what `source` names here: a pod's pull, the pod's namespace (if registry.pull
    lets it pull from there); an operator's, the namespace named, else the one namespace that
    registry.pull lets pull from there."""
    if for_namespace is not None:
        if not cfg.registry.allows("pull", for_namespace, source.registry, source.repository):
            raise PullRefused(f"namespace {for_namespace} may not pull from {source.registry}/{source.repository} "
                              "(node config registry.pull)")
        return for_namespace
    if owner is not None:
        return owner
    pullers = cfg.registry.pullers(source.registry, source.repository)
    if len(pullers) != 1:
        granted = f"registry.pull grants it to {', '.join(pullers)}" if pullers else "registry.pull grants it to none"
        raise PullRefused(f"name the namespace that will own {source} with -n ({granted})")
    return pullers[0]


def pull(cfg: Config, store: Store, source: Reference, local: SnapshotRef | None = None,
         for_namespace: str | None = None, listener: Listener | None = None, cancel: Any = None,
         owner: str | None = None) -> fmt.Snapshot:
    """Fetch the snapshot `source` names into the store, published as `local` (default: the
    reference itself), owned by the namespace owner_for() decides. for_namespace: a pull made for
    a pod of that namespace (node policy applies; the CLI passes None and maybe `owner`). Its
    signatures are verified before any blob is fetched (refused: PullRefused). Bounded: the manifest by
    registry.max_manifest_bytes and max_blobs, the whole pull by registry.pull_deadline, the
    bytes by the owner namespace's quota (claimed before anything is written). `cancel`: an
    object whose is_set() stops the pull (its `reason`, if any, is the error's). Every outcome
    is a `pull` event; a failed pull leaves no pull area."""
    who = for_namespace or "the operator"
    events.emit(cfg, "pull", f"pull of {source} for {who} started", None, "info", snapshot=str(source),
                namespace=for_namespace, outcome="started")
    clock = Stopwatch()
    try:
        snap = _pull_guarded(cfg, store, source, local, for_namespace, listener, cancel, owner)
    except Exception as exc:
        if not isinstance(exc, DistributionError):
            # Whatever broke (a format error in a blob, a local file): named, never a traceback.
            exc = DistributionError(f"pulling {source} into {store.root}: {_describe(exc, store)}")
        reason = safetext.remote(exc, limit=1500)    # it may quote what the registry sent
        events.emit(cfg, "pull", f"pull of {source} for {who} failed: {reason}", None, "warning",
                    snapshot=str(source), namespace=for_namespace, outcome="failed", reason=reason)
        raise exc from None
    seconds = clock.seconds()
    events.emit(cfg, "pull", f"pulled {source} for {who}: {snap.size >> 20} MiB in {seconds:.1f}s", None, "info",
                snapshot=str(source), namespace=for_namespace, outcome="pulled", bytes=snap.size,
                seconds=round(seconds, 3))
    return snap


class PullCancelled(DistributionError):
    """The pull passed registry.pull_deadline, or its caller cancelled it (its pod went away)."""


class _PullGuard:
    """One pull's deadline and cancellation: a watcher thread that, when the deadline passes or
    the caller's cancel is set, stops the transfer's threads and aborts every connection of the
    registry client (a registry that trickles bytes cannot hold a pull past its deadline)."""

    def __init__(self, deadline_s: float, cancel: Any):
        self.deadline_s, self.cancel = deadline_s, cancel
        self.stop = threading.Event()
        self.reason = ""
        self._done = threading.Event()

    def cancelled(self) -> bool:
        return self.stop.is_set()

    @contextlib.contextmanager
    def watching(self, client: RegistryClient) -> Iterator[None]:
        thread = threading.Thread(target=self._watch, args=(client,), name="pull-deadline", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._done.set()
            thread.join()

    def _watch(self, client: RegistryClient) -> None:
        end = time.monotonic() + self.deadline_s
        while not self._done.wait(0.05):
            if self.cancel is not None and self.cancel.is_set():
                self.reason = f"cancelled: {getattr(self.cancel, 'reason', '') or 'its caller stopped it'}"
            elif time.monotonic() >= end:
                self.reason = (f"stopped at its deadline of {self.deadline_s:g} s (registry.pull_deadline; "
                               "raise it for larger snapshots or slower registries)")
            else:
                continue
            self.stop.set()
            client.abort()
            return

    def check(self, source: Reference) -> None:
        if self.stop.is_set():
            raise PullCancelled(f"pull of {source} {self.reason}; what it wrote was removed")


def _pull_guarded(cfg: Config, store: Store, source: Reference, local: SnapshotRef | None,
                  for_namespace: str | None, listener: Listener | None, cancel: Any,
                  owner: str | None) -> fmt.Snapshot:
    owner = owner_for(cfg, source, for_namespace, owner)
    local = local or SnapshotRef.registry(str(source))
    store.init()
    guard = _PullGuard(cfg.registry.pull_deadline, cancel)
    try:
        with _client(cfg, source.registry) as client, guard.watching(client):
            return _pull(cfg, store, client, source, local, owner, listener, guard)
    except DistributionError as exc:
        if guard.reason and not isinstance(exc, PullCancelled):
            raise PullCancelled(f"pull of {source} {guard.reason}; what it wrote was removed") from exc
        if _is_local_failure(exc):          # writing into the store: say where, and what to do
            raise DistributionError(f"pulling {source} into {store.root}: {_describe(exc, store)}") from exc
        raise
    except (ThawError, OSError) as exc:
        if guard.reason:
            raise PullCancelled(f"pull of {source} {guard.reason}; what it wrote was removed") from exc
        raise DistributionError(f"pulling {source} into {store.root}: {_describe(exc, store)}") from exc


def _pull(cfg: Config, store: Store, client: RegistryClient, source: Reference, local: SnapshotRef, owner: str,
          listener: Listener | None, guard: _PullGuard) -> fmt.Snapshot:
    limits = cfg.registry
    got = _registry_call(client.get_manifest, source.repository, source.reference, (fmt.MANIFEST_MEDIA_TYPE,),
                         limits.max_manifest_bytes)
    desc = Descriptor(fmt.MANIFEST_MEDIA_TYPE, got.digest, len(got.data))
    try:
        config_desc, layers = fmt.parse_manifest(got.data, desc)
        if len(layers) + 1 > limits.max_blobs:
            raise DistributionError(f"{source} lists {len(layers) + 1} blobs, more than registry.max_blobs "
                                    f"({limits.max_blobs}) allows: refused before fetching any")
        if config_desc.size > fmt.MAX_META:
            raise fmt.SnapshotFormatError(f"config {config_desc.digest} is too large")
        config_bytes = _registry_call(client.fetch_bytes, source.repository, config_desc.digest, fmt.MAX_META)
        config = fmt.SnapshotConfig.from_json(json.loads(config_bytes))
        snap = fmt.assemble(str(local), desc, config_desc, config, layers)
    except (LayoutError, ValueError) as exc:
        raise DistributionError(f"{source} is not a thaw snapshot this version can use: {exc}") from exc
    if snap.format_version != fmt.FORMAT_VERSION:
        raise DistributionError(f"{source} is a format {snap.format_version} snapshot; registries carry "
                                f"format {fmt.FORMAT_VERSION} only (import the archive instead)")
    repository = f"{source.registry}/{source.repository}"
    try:
        prov, signatures = provenance.verify(cfg, got.digest, signatures_of(client, source.repository, got.digest),
                                             repository, repository, f"{source} ({got.digest})")
    except provenance.Untrusted as exc:
        provenance.report_refusal(cfg, exc, source=str(source), namespace=owner)
        raise PullRefused(str(exc)) from exc
    snap = replace(snap, namespace=owner)        # the node decides; the config says only where it was captured
    with store.pull_area(got.digest, guard.cancelled) as area:
        if not store.has_images(snap):
            _check_space(store, snap)
            store.claim_pull(area, store.charged_to(snap), snap.size, f"pulling {source} into {area}")
            _fetch(client, source, snap, area, config_bytes, listener, guard)
        guard.check(source)
        return _publish(store, snap, area, got.data, config_bytes, f"pulled:{source}", prov, signatures)


def _is_local_failure(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, LocalFileError)


def _describe(exc: BaseException, store: Store) -> str:
    """An error of the local side, with what to do about it."""
    err: BaseException | None = exc
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__
    code = err.errno if isinstance(err, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = (f"the file system of {store.root} is full: free space (thaw gc; thaw rm NAME -n NAMESPACE) "
                "or give the store more room, then pull again")
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"thaw needs to write {store.root} (run as root; the store's file system must be writable)"
    elif isinstance(exc, fmt.SnapshotFormatError):
        hint = "the registry's snapshot is malformed: push it again from a node that has it"
    elif isinstance(exc, StoreError):
        return str(exc)
    else:
        hint = f"check the store's file system ({store.root}), then pull again"
    return f"{exc}; {hint}"


def _check_space(store: Store, snap: fmt.Snapshot) -> None:
    usage = shutil.disk_usage(store.root)
    need = snap.size + min(SPACE_MARGIN, usage.total // 20)
    if usage.free < need:
        raise DistributionError(f"not enough space in {store.root} to pull {snap.ref}: "
                                f"{usage.free >> 20} MiB free, {need >> 20} MiB needed; free space "
                                f"(thaw gc; thaw rm NAME -n NAMESPACE) or give the store more room")


def _fetch(client: RegistryClient, source: Reference, snap: fmt.Snapshot, area: str, config_bytes: bytes,
           listener: Listener | None, guard: _PullGuard) -> None:
    images = make_private_dir(os.path.join(area, "images"))
    blobs = make_private_dir(os.path.join(area, "blobs"))
    for name, size in snap.files().items():        # each CRIU file its final size; parts fill it
        fd = os.open(os.path.join(images, name), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
    ranges = [BlobRange(p.desc.digest, os.path.join(images, p.file), p.offset, p.desc.size) for p in snap.parts]
    ranges += [BlobRange(d.digest, os.path.join(blobs, d.digest.split(":")[1]), 0, d.size)
               for d in (snap.criu_whole, snap.rootfs, snap.deleted)]
    _registry_call(transfer.pull_blobs, client, source.repository, ranges,
                   journal=os.path.join(area, "journal.json"), listener=listener, cancel=guard.stop)


def _publish(store: Store, snap: fmt.Snapshot, area: str, manifest: bytes, config_bytes: bytes,
             origin: str, prov: provenance.Provenance, signatures: list[cosign.Signature]) -> fmt.Snapshot:
    """Every blob is verified: into the layout, the small CRIU files unpacked, then published."""
    with store.staging("pull") as staging:
        hashes = None
        if store.has_images(snap):                  # this manifest is here already, under another name
            images = staging.new_dir("images")
        else:
            images = os.path.join(area, "images")
            part_files = snap.files()                # once: n blobs cost O(n), not O(n^2)
            for name in os.listdir(images):          # whole files of an earlier, interrupted unpack
                if name not in part_files:
                    os.unlink(os.path.join(images, name))
            for d in (snap.criu_whole, snap.rootfs, snap.deleted):
                if not store.layout.has_blob(d):
                    staging.layout.commit_blob(os.path.join(area, "blobs", d.digest.split(":")[1]), d.digest)
            faults.point("unpack")                   # the tests kill a pull here
            with open(store.layout.blob_path(snap.criu_whole.digest), "rb") as f:
                hashes = fmt.unpack_whole_files(f, images, snap.criu_whole.size)
        for data, media_type, want in ((config_bytes, fmt.CONFIG_MEDIA_TYPE, snap.config_desc.digest),
                                       (manifest, fmt.MANIFEST_MEDIA_TYPE, snap.manifest.digest)):
            if staging.layout.put_bytes(data, media_type).digest != want:
                raise DistributionError(f"{snap.ref}: blob {want} changed on the way in")
        try:
            return store.publish(snap, images, origin, hashes, pull_area=area, provenance=prov,
                                 signatures=signatures)
        except StoreError as exc:
            raise DistributionError(f"publishing {snap.ref}: {exc}") from exc


# --- waiting for a pull on demand (thaw.dev/pull: wait) ----------------------------------------------

def present(cfg: Config, ref: SnapshotRef, namespace: str) -> bool:
    try:
        Store.for_config(cfg).resolve(ref, namespace, cfg.policy.readable_from(namespace))
        return True
    except StoreError:
        return False


def wait_present(cfg: Config, ref: SnapshotRef, namespace: str, timeout: float) -> bool:
    """Whether `ref` became restorable for `namespace` within `timeout` seconds (a pull started
    beside the caller fills it; the events log says how that pull went)."""
    deadline = time.monotonic() + timeout
    while not present(cfg, ref, namespace):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True

"""Store: the one face of the store. It holds the parts, each the one owner of its files —
Index (index.json and the locks of names), ImageDirs (the unpacked CRIU image directories and
their seals), WorkAreas (staging and pulls in progress) and Limits (sizes, quotas, eviction) —
and does what spans them: publish, remove, garbage collection, export, and telling the node
(events, store gauges)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

from thaw.oci import cosign
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.files import make_private_dir
from thaw.oci.layout import Descriptor, ImageLayout, LayoutError

from ...drivers import criu_images
from .. import events, metrics
from ..config import Config
from ..provenance import Provenance, from_origin
from .errors import CorruptSnapshot, StoreError
from .files import hex_of, tree_bytes, unlink
from .images import ImageDirs
from .index import Index
from .limits import Evicted, Limits
from .staging import Staging, WorkAreas


class Store:
    def __init__(self, root: str, cfg: Config | None = None):
        self.root = root
        self.layout = ImageLayout(os.path.join(root, "layout"))
        self.images_dir = os.path.join(root, "images")
        self.staging_dir = os.path.join(root, "staging")
        self._cfg = cfg                  # the node config: store gauges go to its metrics_dir
        self.index = Index(root, self.layout)
        self.images = ImageDirs(self.images_dir, self.layout, self.report, self._unpublish_corrupt)
        self.areas = WorkAreas(root, self.staging_dir, self.layout)
        self.limits = Limits(root, cfg, self.layout, self.index, self.images, self.areas, self.report)

    @classmethod
    def for_config(cls, cfg: Config) -> Store:
        """The node's store, reporting its size to the node's metrics and bounded by the node's
        store.max_bytes (each publish evicts down to it)."""
        return cls(cfg.store_dir, cfg)

    # --- setup and locking --------------------------------------------------------------------
    def init(self) -> Store:
        """Create the store if needed (a format 1 store thaw 0.1 left is converted by
        importer.open_store, which every `thaw` command goes through)."""
        self._make_dirs()
        return self

    def is_format_1(self) -> bool:
        return os.path.isdir(os.path.join(self.root, "layers"))

    def _make_dirs(self) -> None:
        for d in (self.root, self.images_dir, self.staging_dir):
            make_private_dir(d)
        os.chmod(self.root, 0o700)
        self.layout.init()

    def locked(self) -> contextlib.AbstractContextManager[int]:
        return self.index.locked()

    def name_lock(self, ref: SnapshotRef, namespace: str) -> contextlib.AbstractContextManager[int]:
        return self.index.name_lock(ref, namespace)

    @contextlib.contextmanager
    def staging(self, kind: str) -> Iterator[Staging]:
        self._make_dirs()
        with self.areas.staging(kind) as staging:
            yield staging

    @contextlib.contextmanager
    def pull_area(self, digest: str, cancelled: Callable[[], bool] | None = None) -> Iterator[str]:
        self._make_dirs()
        with self.areas.pull_area(digest, cancelled) as area:
            yield area

    # --- reading: the index (index.py) ------------------------------------------------------------
    def read(self, desc: Descriptor) -> fmt.Snapshot:
        return self.index.read(desc)

    def snapshots(self, namespace: str | None = None) -> list[fmt.Snapshot]:
        return self.index.snapshots(namespace)

    def resolve(self, ref: SnapshotRef, namespace: str, readable_from: tuple[str, ...] = ()) -> fmt.Snapshot:
        return self.index.resolve(ref, namespace, readable_from)

    def provenance(self, snap: fmt.Snapshot) -> Provenance:
        return self.index.provenance(snap)

    def signatures(self, snap: fmt.Snapshot) -> list[cosign.Signature]:
        return self.index.signatures(snap)

    def origin(self, snap: fmt.Snapshot) -> str:
        return self.index.origin(snap)

    def pushed(self, snap: fmt.Snapshot) -> str:
        return self.index.pushed(snap)

    def mark_pushed(self, snap: fmt.Snapshot, ref: str) -> None:
        self.index.mark_pushed(snap, ref)

    def add_signature(self, snap: fmt.Snapshot, signature: cosign.Signature) -> None:
        self.index.add_signature(snap, signature)

    # --- reading: blobs of the layout ------------------------------------------------------------
    def deleted_paths(self, snap: fmt.Snapshot) -> list[str]:
        try:
            return fmt.read_deleted(self.layout.read_blob(snap.deleted, fmt.MAX_META))
        except LayoutError as exc:
            raise CorruptSnapshot(f"snapshot {snap.ref}: deleted-files layer: {exc}") from exc

    def open_rootfs_layer(self, snap: fmt.Snapshot) -> IO[bytes]:
        """The rootfs diff layer, verified by digest first (it is small and applied into a rootfs)."""
        try:
            self.layout.verify_blob(snap.rootfs)
        except LayoutError as exc:
            raise CorruptSnapshot(f"snapshot {snap.ref}: rootfs layer: {exc}") from exc
        return open(self.layout.blob_path(snap.rootfs.digest), "rb")

    def open_blob(self, snap: fmt.Snapshot, desc: Descriptor) -> Any:
        """Any blob of `snap` as a readable stream (export, push): a file part is read from the
        CRIU image file it is a range of."""
        for part in snap.parts:
            if part.desc.digest == desc.digest:
                path = os.path.join(self.image_path(snap), part.file)
                return fmt.RangeReader(path, part.offset, part.desc.size)
        return open(self.layout.blob_path(desc.digest), "rb")

    # --- the CRIU image directory a restore reads (images.py) --------------------------------------
    def image_path(self, snap: fmt.Snapshot) -> str:
        return self.images.path(snap)

    def image_dir(self, snap: fmt.Snapshot, verify: str = "stat") -> contextlib.AbstractContextManager[str]:
        return self.images.hold(snap, verify)

    def image_facts(self, snap: fmt.Snapshot) -> criu_images.Images:
        """What the snapshot's CRIU images would restore (the caller holds image_dir)."""
        return self.images.facts(snap)

    def has_images(self, snap: fmt.Snapshot) -> bool:
        return self.images.sealed(snap)

    def touch(self, snap: fmt.Snapshot) -> None:
        self.images.touch(snap)

    def last_used(self, snap: fmt.Snapshot) -> float | None:
        return self.images.last_used(snap)

    # --- sizes, quotas, eviction (limits.py) --------------------------------------------------------
    def size(self, snap: fmt.Snapshot) -> int:
        return self.limits.size(snap)

    def total_bytes(self) -> int:
        return self.limits.total_bytes()

    @staticmethod
    def charged_to(snap: fmt.Snapshot) -> str:
        return Limits.charged_to(snap)

    def capacity(self) -> int:
        return self.limits.capacity()

    def quota_of(self, namespace: str) -> int:
        return self.limits.quota_of(namespace)

    def usage(self, namespace: str) -> int:
        """Bytes charged to `namespace`: its snapshots' files (each once) and its pulls in progress."""
        with self.locked():
            return self.limits.usage_locked(namespace)

    def evict(self, max_bytes: int, evict_unpushed: bool = False) -> list[Evicted]:
        """Remove least recently used snapshots until the published ones hold at most `max_bytes`
        (0: unbounded, nothing is removed). Never one a restore is reading; unless
        `evict_unpushed`, only those that can be fetched again (pulled, or pushed since). Each
        removal goes to the events log; so does, once, why the store stays over `max_bytes` if
        nothing more may go."""
        if max_bytes <= 0:
            return []
        with self.locked():
            evicted = self.limits.evict_locked(max_bytes, evict_unpushed)
            if evicted:
                self._gc_locked()
                self._changed()
        return evicted

    def claim_pull(self, area: str, namespace: str, nbytes: int, what: str) -> list[Evicted]:
        """Before a pull writes anything: charge `nbytes` (what its manifest declares) to
        `namespace` for as long as `area` is held, evicting that namespace's own least recently
        used snapshots if needed. QuotaExceeded if it cannot fit."""
        with self.locked():
            evicted = self.limits.make_room_locked(namespace, {"pull:" + area: nbytes}, "", area, what)
            self.areas.claim(area, namespace, nbytes)
            if evicted:
                self._gc_locked()
                self._changed()
        return evicted

    def check_room(self, namespace: str, nbytes: int, what: str) -> None:
        """QuotaExceeded now if `nbytes` more could not fit `namespace` even after evicting what
        it may (an import checks before it writes; its publish then evicts for real)."""
        with self.locked():
            self.limits.make_room_locked(namespace, {"new:" + what: nbytes}, "", None, what, dry_run=True)

    # --- publishing and removing ------------------------------------------------------------------
    def publish(self, snap: fmt.Snapshot, staged_images: str, origin: str,
                hashes: dict[str, str] | None = None, pull_area: str | None = None,
                provenance: Provenance | None = None, signatures: list[cosign.Signature] | tuple[cosign.Signature, ...] = (),
                ) -> fmt.Snapshot:
        """Make `snap` visible under (snap.namespace — the owner the caller decided, ref),
        replacing that name's older snapshot: its staged CRIU image directory moves into place
        and is sealed, then the index changes. First it must fit its namespace's quota and
        store.max_bytes, by evicting only that namespace's own snapshots (QuotaExceeded, nothing
        changed, if it cannot). `pull_area`: the pull it came from, whose claim it replaces.
        provenance: what the caller verified (default: read from the origin, see
        provenance.from_origin); signatures: cosign signatures to keep with it."""
        prov = provenance or from_origin(origin)
        for d in (snap.manifest, snap.config_desc, snap.criu_whole, snap.rootfs, snap.deleted):
            if not self.layout.has_blob(d):
                raise StoreError(f"cannot publish {snap.ref}: blob {d.digest} missing")
        target = self.image_path(snap)
        with self.locked():
            if os.path.isdir(target) and not os.path.exists(target + ".seal"):
                self.images.remove(target)          # under the store lock: its publish is dead
            hexd = "images/" + hex_of(snap.manifest.digest)
            new = {d.digest: d.size for d in (snap.manifest, snap.config_desc, snap.criu_whole, snap.rootfs,
                                              snap.deleted)}
            new[hexd] = self.images.bytes_of(snap) if os.path.isdir(target) else tree_bytes(staged_images)
            self.limits.make_room_locked(self.charged_to(snap), new, snap.manifest.digest, pull_area,
                                         f"publishing {snap.ref} ({snap.namespace})")
            if not os.path.isdir(target):
                self.images.place(snap, staged_images, hashes)
            self.index.publish_locked(snap, origin, prov, signatures)
            self._gc_locked()
            self._changed()
        return snap

    def remove(self, ref: SnapshotRef, namespace: str) -> None:
        with self.locked():
            self.index.remove_locked(ref, namespace)
            self._gc_locked()
            self._changed()

    def _unpublish_corrupt(self, snap: fmt.Snapshot, why: str) -> NoReturn:
        with self.locked():
            if self.index.unpublish_locked(snap.manifest.digest):
                self._changed()
        self.report("error", f"snapshot {snap.ref} ({snap.namespace}) removed: {why}")
        raise CorruptSnapshot(f"snapshot {snap.ref}: {why}; removed from the store")

    def gc(self) -> int:
        """Delete what no published snapshot references (see _gc_locked); returns bytes freed."""
        with self.locked():
            return self._gc_locked()

    def _gc_locked(self) -> int:
        """Delete blobs and image directories no published snapshot references (an image
        directory only when no restore holds it), leftover temp files, and staging areas whose
        owner process is gone. Caller holds the store lock. Returns the bytes freed."""
        live_blobs: set[str] = set()
        live_images: set[str] = set()
        for desc in self.index.entries():
            live_blobs.add(desc.digest)
            live_images.add(hex_of(desc.digest))
            with contextlib.suppress(StoreError):
                live_blobs.update(d.digest for d in self.read(desc).blobs)
        freed = self.areas.reap_staging()
        live_blobs |= self.areas.live_staging()
        freed += self.areas.gc_pulls()
        blob_dir = os.path.join(self.layout.root, "blobs", "sha256")
        for name in os.listdir(blob_dir):
            if name.startswith(".") or "sha256:" + name not in live_blobs:
                freed += unlink(os.path.join(blob_dir, name))
        return freed + self.images.sweep(live_images)

    # --- telling the node ---------------------------------------------------------------------------
    def _changed(self) -> None:
        """The published set changed (caller holds the lock): rewrite the store gauges."""
        if self._cfg is None or not self._cfg.metrics_dir:
            return
        snaps = self.snapshots()
        blobs = {d.digest: d.size for s in snaps for d in s.blobs}
        metrics.record_store(self._cfg, len(snaps), sum(blobs.values()))

    def report(self, level: str, msg: str) -> None:
        """A store event (repairs, removals) in the node's events log."""
        if self._cfg is not None:
            events.emit(self._cfg, "store", msg, level=level)

    # --- export -------------------------------------------------------------------------------------
    def export(self, ref: SnapshotRef, namespace: str, out_path: str, verify: str = "digest") -> fmt.Snapshot:
        snap = self.resolve(ref, namespace)
        for d in (snap.criu_whole, snap.rootfs, snap.deleted):
            try:
                self.layout.verify_blob(d)
            except LayoutError as exc:
                raise CorruptSnapshot(f"snapshot {ref}: {exc}") from exc
        signatures = self.signatures(snap)
        attached = [(cosign.tag_for(snap.manifest.digest), *cosign.manifest(signatures))] if signatures else []
        with self.image_dir(snap, verify):
            fmt.write_archive([snap], lambda d: self.open_blob(snap, d), out_path, attached)
        return snap

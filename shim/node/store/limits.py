"""The node cache's limits: what each published snapshot holds on disk, what each namespace is
charged, and eviction of least recently used snapshots to stay within a namespace's quota
(store.quota, store.quota_share of capacity()) and the store's store.max_bytes.

What a namespace is charged for is what its snapshots hold, each file once per namespace (a file
several namespaces hold counts for each), plus the declared size of its pulls in progress. This
part owns no file: it reads the index, the image directories and the pull areas, and removes
what it evicts through them. Its methods ending in _locked run under the store lock."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from thaw.oci import snapshot as fmt
from thaw.oci.layout import Descriptor, ImageLayout

from ..config import Config, StoreLimits
from .errors import QuotaExceeded, StoreError
from .files import file_bytes, flock_if_free, hex_of, lock_free
from .images import ImageDirs
from .index import Index
from .staging import WorkAreas

# An entry of the index, read: its descriptor, the snapshot, what it holds on disk (key -> bytes).
Entry = tuple[Descriptor, fmt.Snapshot, dict[str, int]]


@dataclass(frozen=True)
class Evicted:
    """A snapshot the node cache removed, and the bytes that freed (its image directory and the
    blobs no remaining snapshot uses)."""
    ref: str
    namespace: str
    digest: str
    bytes_freed: int


class Limits:
    def __init__(self, root: str, cfg: Config | None, layout: ImageLayout, index: Index, images: ImageDirs,
                 areas: WorkAreas, report: Callable[[str, str], None]):
        self.root = root
        self._cfg = cfg
        self.layout = layout
        self.index = index
        self.images = images
        self.areas = areas
        self._report = report

    # --- what snapshots hold ------------------------------------------------------------------------
    @staticmethod
    def _layout_blobs(snap: fmt.Snapshot) -> set[str]:
        """The digests of `snap`'s blobs kept in the layout (its file parts are not: they are
        byte ranges of its image directory)."""
        return {d.digest for d in (snap.manifest, snap.config_desc, snap.criu_whole, snap.rootfs, snap.deleted)}

    def held(self, snap: fmt.Snapshot) -> dict[str, int]:
        """What `snap` holds on disk -> its bytes: each layout blob by digest, and its image
        directory with its seal as "images/<hex>"."""
        out = {digest: file_bytes(self.layout.blob_path(digest)) for digest in self._layout_blobs(snap)}
        out["images/" + hex_of(snap.manifest.digest)] = self.images.bytes_of(snap)
        return out

    def size(self, snap: fmt.Snapshot) -> int:
        """Bytes on disk that `snap` holds: its blobs in the layout (manifest, config, whole-file
        tar, rootfs diff, deleted list) plus its CRIU image directory and seal; apparent file
        sizes. A blob shared with other snapshots counts for each of them, so the sizes of
        several snapshots can add up to more than the store holds (total_bytes counts it once)."""
        return sum(self.held(snap).values())

    def total_bytes(self) -> int:
        """Bytes on disk that the published snapshots hold together, each file counted once."""
        held: dict[str, int] = {}
        for snap in self.index.snapshots():
            held.update(self.held(snap))
        return sum(held.values())

    def _entries(self) -> list[Entry]:
        out = []
        for desc in self.index.entries():
            with contextlib.suppress(StoreError):
                snap = self.index.read(desc)
                out.append((desc, snap, self.held(snap)))
        return out

    # --- namespace quotas ---------------------------------------------------------------------------
    @staticmethod
    def charged_to(snap: fmt.Snapshot) -> str:
        """The namespace a published snapshot's bytes are charged to: its owner namespace — the
        one the node published it under (Store.read takes it from the index entry: the namespace
        that captured it, or the one the node's policy pulled or imported it for)."""
        return snap.namespace

    def _limits(self) -> StoreLimits | None:
        return getattr(self._cfg, "store", None)

    def capacity(self) -> int:
        """What a quota share is a share of: store.max_bytes, else the size of the store's file system."""
        limits = self._limits()
        if limits is not None and limits.max_bytes > 0:
            return int(limits.max_bytes)
        st = os.statvfs(self.root if os.path.isdir(self.root) else os.path.dirname(self.root))
        return st.f_blocks * st.f_frsize

    def quota_of(self, namespace: str) -> int:
        """`namespace`'s byte quota (0: unbounded): store.quota[namespace], else store.quota_share
        of capacity(). A store opened without a node config has none."""
        limits = self._limits()
        if limits is None:
            return 0
        if namespace in limits.quota:
            return int(limits.quota[namespace])
        return int(self.capacity() * limits.quota_share)

    def _charged(self, entries: list[Entry], namespace: str, extra: dict[str, int] | None = None) -> int:
        held: dict[str, int] = dict(extra or {})
        for _d, snap, h in entries:
            if self.charged_to(snap) == namespace:
                held.update(h)
        return sum(held.values())

    def usage_locked(self, namespace: str) -> int:
        """Bytes charged to `namespace`: its snapshots' files (each once) and its pulls in progress."""
        return self._charged(self._entries(), namespace) + self.areas.pull_claims().get(namespace, 0)

    # --- eviction -----------------------------------------------------------------------------------
    def evict_locked(self, max_bytes: int, evict_unpushed: bool, keep: str = "") -> list[Evicted]:
        """Store.evict() for a caller holding the store lock, who then runs the store's gc (which
        deletes the blobs the evicted snapshots alone held) and records the change. `keep`: a
        manifest digest never to evict (the snapshot just published)."""
        index = self.index.entries()
        snaps: list[Entry] = []
        for desc in index:
            with contextlib.suppress(StoreError):
                snap = self.index.read(desc)
                snaps.append((desc, snap, self.held(snap)))

        def total(entries: list[Entry]) -> int:
            return sum({k: v for _d, _s, held in entries for k, v in held.items()}.values())
        live = list(snaps)
        now_total = total(live)
        evicted: list[Evicted] = []
        in_use: list[str] = []
        unpushed: list[str] = []
        kept = False
        by_age = sorted(snaps, key=lambda e: (self.images.last_used(e[1]) or 0.0, e[1].namespace, e[1].ref))
        for entry in by_age:
            if now_total <= max_bytes:
                break
            desc, snap, _held = entry
            name = f"{snap.ref} ({snap.namespace})"
            if snap.manifest.digest == keep:
                kept = True
                continue
            if not evict_unpushed and not self.index.fetchable_again(desc):
                unpushed.append(name)
                continue
            used = self.images.last_used(snap)
            path = self.images.path(snap)
            with flock_if_free(path + ".lock") as free:
                if not free:
                    in_use.append(name)          # a restore reads it
                    continue
                live.remove(entry)
                index = [d for d in index if d is not desc]
                self.index.write(index)          # unpublished first: never an entry without its files
                if not any(s.manifest.digest == snap.manifest.digest for _d, s, _h in live):
                    self.images.remove_held(path)
            after = total(live)
            evicted.append(Evicted(snap.ref, snap.namespace, snap.manifest.digest, now_total - after))
            now_total = after
            when = "unknown" if used is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(used))
            self._report("info", f"snapshot {name} evicted from the node cache (least recently used, last "
                                 f"{when}): {evicted[-1].bytes_freed} bytes freed, the store holds {now_total} "
                                 f"of store.max_bytes {max_bytes}")
        if now_total > max_bytes:
            why = []
            if in_use:
                why.append(f"in use by a restore: {', '.join(in_use)}")
            if unpushed:
                why.append(f"captured or imported here and never pushed (store.evict_unpushed is off): "
                           f"{', '.join(unpushed)}")
            if kept:
                why.append("the snapshot just published is kept")
            self._report("warning", f"store holds {now_total} bytes, over store.max_bytes {max_bytes}; "
                                    f"nothing more may be evicted ({'; '.join(why) or 'no snapshot left'})")
        return evicted

    def make_room_locked(self, namespace: str, new: dict[str, int], keep: str, exclude_area: str | None,
                         what: str, dry_run: bool = False) -> list[Evicted]:
        """Make `new` (file key -> bytes) fit `namespace`'s quota and store.max_bytes, evicting
        only `namespace`'s own snapshots, least recently used first: never `keep`, one a
        restore reads, one whose files all stay held by a kept snapshot, nor (unless
        store.evict_unpushed) one no registry holds. Caller holds the store lock and runs
        the store's gc after. Raises QuotaExceeded, having evicted nothing, if it cannot fit."""
        limits = self._limits()
        if limits is None:
            return []
        quota, max_bytes = self.quota_of(namespace), int(limits.max_bytes)
        claims = self.areas.pull_claims(exclude_area)
        index = self.index.entries()
        entries = self._entries()

        def sizes() -> tuple[int, int]:
            mine = self._charged(entries, namespace, new) + claims.get(namespace, 0)
            every = dict(new)
            for _d, _s, h in entries:
                every.update(h)
            return mine, sum(every.values()) + sum(claims.values())

        def over() -> bool:
            mine, total = sizes()
            return (quota > 0 and mine > quota) or (max_bytes > 0 and total > max_bytes)
        if not over():
            return []
        plan: list[tuple[Descriptor, fmt.Snapshot, int]] = []
        skipped: list[str] = []
        own = sorted((e for e in entries if self.charged_to(e[1]) == namespace),
                     key=lambda e: (self.images.last_used(e[1]) or 0.0, e[1].ref))
        full = list(entries)
        for entry in own:
            if not over():
                break
            if entry not in entries:
                continue                        # planned with another name of its manifest
            # Every name of one manifest in this namespace goes together: they share one image
            # directory, so evicting one name alone frees nothing.
            group = [e for e in own if e in entries and e[1].manifest.digest == entry[1].manifest.digest]
            names = ", ".join(f"{e[1].ref} ({e[1].namespace})" for e in group)
            if entry[1].manifest.digest == keep:
                continue
            unpushed = [e for e in group if not limits.evict_unpushed and not self.index.fetchable_again(e[0])]
            if unpushed:
                skipped.append(f"{names}: captured or imported here, never pushed")
                continue
            held = {k: v for e in group for k, v in e[2].items()}
            others = set(new)
            for e in entries:
                if not any(e is g for g in group):
                    others.update(e[2])
            if set(held) <= others:
                skipped.append(f"{names}: its files are shared with a kept snapshot")
                continue
            if not lock_free(self.images.path(entry[1]) + ".lock"):
                skipped.append(f"{names}: a restore reads it")
                continue
            freed = sum(v for k, v in held.items() if k not in others)
            for e in group:
                entries.remove(e)
                plan.append((e[0], e[1], freed if e is group[-1] else 0))
        if over():
            entries[:] = full
            mine, total = sizes()
            why = (f"namespace {namespace} would hold {mine} bytes, over its quota of {quota} bytes"
                   if quota > 0 and mine > quota else
                   f"the store would hold {total} bytes, over store.max_bytes {max_bytes}")
            raise QuotaExceeded(
                f"{what}: {why}; nothing more of {namespace} may be evicted"
                f"{' (' + '; '.join(skipped) + ')' if skipped else ''}. Remove some of its snapshots "
                f"(thaw ls -n {namespace}; thaw rm NAME -n {namespace}) or raise store.quota for it "
                f"(store.quota_share: {limits.quota_share}) in the node config")
        if dry_run:
            return []
        evicted = []
        for desc, snap, freed in plan:
            path = self.images.path(snap)
            with flock_if_free(path + ".lock") as free:
                if not free:        # a restore started since: keep it, and count it again
                    entries.append(next(e for e in full if e[0] is desc))
                    continue
                index = [d for d in index if d != desc]
                self.index.write(index)  # unpublished first: never an entry without its files
                if not any(d.digest == snap.manifest.digest for d in index):
                    self.images.remove_held(path)
            evicted.append(Evicted(snap.ref, snap.namespace, snap.manifest.digest, freed))
            self._report("info", f"snapshot {snap.ref} ({snap.namespace}) evicted (least recently used of its "
                                 f"namespace) to make room for {what}")
        if over():
            raise QuotaExceeded(f"{what}: a restore started on a snapshot chosen for eviction; try again")
        return evicted

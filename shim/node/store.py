"""The snapshot store: the one owner of store_dir.

  store_dir/layout/            OCI image layout. index.json names each published snapshot by its
                               ref (NAME:TAG) and owner namespace (dev.thaw.namespace); blobs/
                               holds manifests, configs, the CRIU whole-file tars, rootfs diffs and
                               deleted lists — never a file part
  store_dir/images/<hex>/      the CRIU image directory of the snapshot with manifest sha256:<hex>,
                               kept once: a restore reads it, and each file part of the manifest is
                               a byte range of one of its files
  store_dir/images/<hex>.seal  what the directory held when it was published (per file: size,
                               mtime; whole files also their digest); checked before a restore
  store_dir/images/<hex>.lock  held shared while a restore reads the directory; its mtime is the
                               snapshot's last use (the node cache evicts least recently used)
  store_dir/staging/<id>/      captures, imports and conversions in progress (owner process and
                               the blobs written so far): never visible as snapshots
  store_dir/locks/             per-snapshot-name locks (auto-capture captures once)
  store_dir/pulls/<hex>/       a pull of manifest sha256:<hex> in progress (CRIU files being
                               filled, small blobs, its resume journal, .claim: the namespace
                               charged and the bytes its manifest declares), locked by
                               pulls/<hex>.lock while a pull runs; removed when the pull ends,
                               however it ends; gc removes one whose pull process is gone
  store_dir/.lock              serialises index changes and garbage collection

A snapshot belongs to the namespace the node published it under (dev.thaw.namespace of its
index entry): the one that captured it, or the one a pull or import was made for — never a field
of the snapshot itself. It is found only under that namespace (or by a namespace the node's
policy lets read it). Each index entry also records the snapshot's provenance (shim/node/provenance.py)
and the cosign signatures known for it (exported with it). Each namespace has a byte quota (Store.quota_of);
what a namespace is charged for is what its snapshots hold, each file once per namespace (a file
several namespaces hold counts for each), plus the declared size of its pulls in progress;
Store.charged_to names the namespace a snapshot is charged to. It becomes visible only when index.json is
replaced with one naming it, after every blob and file is in place and verified. Everything is
root-only, process memory 0600 or 0400.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

from thaw.oci import ThawError, cosign
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.files import atomic_write, make_private_dir
from thaw.oci.layout import REF_NAME, Descriptor, HashingWriter, ImageLayout, LayoutError, sha256_file
from thaw.shim import faults
from thaw.shim.drivers.procs import ProcessHandle

from .config import Config, StoreLimits
from .provenance import Provenance, from_origin, signatures_from_json, signatures_json

CLAIM = ".claim"                    # in a pull area: {"namespace", "bytes"} the pull is charged
ORIGIN = "dev.thaw.origin"          # index annotation: "captured", "imported", "pulled:REF", "migrated"
PUSHED = "dev.thaw.pushed"          # index annotation: the registry reference it was last pushed to
PROVENANCE = "dev.thaw.provenance"  # index annotation: JSON of provenance.Provenance
SIGNATURES = "dev.thaw.signatures"  # index annotation: JSON list of cosign signatures (payload, signature)


class StoreError(ThawError):
    pass


class SnapshotNotFound(StoreError):
    pass


class CorruptSnapshot(StoreError):
    pass


class QuotaExceeded(StoreError):
    """A capture, import or pull would take its namespace past its quota (or the store past
    store.max_bytes), and nothing more of that namespace may be evicted."""


@contextlib.contextmanager
def _flock(path: str, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Evicted:
    """A snapshot the node cache removed, and the bytes that freed (its image directory and the
    blobs no remaining snapshot uses)."""
    ref: str
    namespace: str
    digest: str
    bytes_freed: int


def _lock_free(path: str) -> bool:
    with _flock_if_free(path) as free:
        return free


@contextlib.contextmanager
def _flock_polled(path: str, cancelled: Callable[[], bool] | None) -> Iterator[int]:
    """An exclusive flock on `path`, waited for in short polls so that `cancelled()` can end the
    wait (a pull's deadline or its sandbox's delete); StoreError then. The lock file gc may
    unlink between our open and our lock is detected and opened again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancelled is not None and cancelled():
                        raise StoreError(f"stopped waiting for {path} (held by another pull)") from None
                    time.sleep(0.1)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)


@contextlib.contextmanager
def _flock_if_free(path: str) -> Iterator[bool]:
    """Hold `path` exclusively for the block if nobody holds it (True), else do not wait (False)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _unlink(path: str) -> int:
    """Remove a file; the bytes that freed (0 if it was already gone)."""
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def _file_bytes(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _tree_bytes(path: str, allocated: bool = False) -> int:
    """The bytes of the files under `path` (apparent sizes, as everything the node cache counts;
    `allocated`: the disk blocks they take, for sparse files being filled)."""
    total = 0
    for d, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(d, name))
                total += st.st_blocks * 512 if allocated else st.st_size
    return total


def _workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


# A snapshot of the index, read: its descriptor, the snapshot, what it holds on disk (path -> bytes).
Entry = tuple[Descriptor, fmt.Snapshot, dict[str, int]]


class Store:
    def __init__(self, root: str, cfg: Config | None = None):
        self.root = root
        self.layout = ImageLayout(os.path.join(root, "layout"))
        self.images_dir = os.path.join(root, "images")
        self.staging_dir = os.path.join(root, "staging")
        self._cfg = cfg                  # the node config: store gauges go to its metrics_dir

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
        """Serialises index changes and garbage collection."""
        return _flock(os.path.join(self.root, ".lock"))

    def name_lock(self, ref: SnapshotRef, namespace: str) -> contextlib.AbstractContextManager[int]:
        """Serialises captures of one snapshot name of one namespace (auto-capture)."""
        locks = make_private_dir(os.path.join(self.root, "locks"))
        return _flock(os.path.join(locks, f"{namespace}_{ref.key()}.lock"))

    @contextlib.contextmanager
    def staging(self, kind: str) -> Iterator[Staging]:
        """A private working area inside the store (same file system as everything published)."""
        self._make_dirs()
        path = os.path.join(self.staging_dir, f"{kind}-{uuid.uuid4().hex[:12]}")
        os.mkdir(path, 0o700)
        atomic_write(os.path.join(path, ".owner"), json.dumps(ProcessHandle.me().to_json()).encode(),
                     durable=False)
        try:
            yield Staging(self, path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def pull_area(self, digest: str, cancelled: Callable[[], bool] | None = None) -> Iterator[str]:
        """store_dir/pulls/<hex>/ for a pull of manifest `digest`, exclusively the caller's until
        it is done (a second pull of the same manifest waits here, until `cancelled()`).
        Removed when the caller finishes, whether it succeeded or failed: what a failed pull
        wrote is given back at once."""
        self._make_dirs()
        pulls = make_private_dir(os.path.join(self.root, "pulls"))
        hexd = _hex(digest)
        with _flock_polled(os.path.join(pulls, hexd + ".lock"), cancelled):
            area = make_private_dir(os.path.join(pulls, hexd))
            try:
                yield area
            finally:
                shutil.rmtree(area, ignore_errors=True)

    def _gc_pulls(self) -> int:
        """Remove every pull area no pull process holds (its owner is gone); bytes freed."""
        pulls = os.path.join(self.root, "pulls")
        freed = 0
        for name in os.listdir(pulls) if os.path.isdir(pulls) else []:
            path = os.path.join(pulls, name)
            if name.endswith(".lock") or not os.path.isdir(path):
                continue
            with _flock_if_free(path + ".lock") as free:   # not free: a pull is filling it
                if free:
                    freed += _tree_bytes(path, allocated=True)
                    shutil.rmtree(path, ignore_errors=True)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + ".lock")
        return freed

    def _pull_claims(self, exclude: str | None = None) -> dict[str, int]:
        """namespace -> bytes declared by the pulls in progress (areas whose lock is held)."""
        pulls = os.path.join(self.root, "pulls")
        out: dict[str, int] = {}
        for name in os.listdir(pulls) if os.path.isdir(pulls) else []:
            path = os.path.join(pulls, name)
            if name.endswith(".lock") or path == exclude:
                continue
            try:
                with open(os.path.join(path, CLAIM)) as f:
                    claim = json.load(f)
                ns, n = str(claim["namespace"]), int(claim["bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            with _flock_if_free(path + ".lock") as free:
                if not free:
                    out[ns] = out.get(ns, 0) + n
        return out

    # --- reading --------------------------------------------------------------------------------
    def _index(self) -> list[Descriptor]:
        return self.layout.read_index() if os.path.exists(self.layout.index_path) else []

    def read(self, desc: Descriptor) -> fmt.Snapshot:
        """The snapshot an index entry names, its manifest and config verified by digest."""
        ann = desc.annotations or {}
        try:
            config_desc, layers = fmt.parse_manifest(self.layout.read_blob(desc, fmt.MAX_META), desc)
            config = fmt.SnapshotConfig.from_json(json.loads(self.layout.read_blob(config_desc, fmt.MAX_META)))
        except (LayoutError, ValueError) as exc:
            raise CorruptSnapshot(f"snapshot {ann.get(REF_NAME, desc.digest)}: {exc}") from exc
        try:
            snap = fmt.assemble(ann.get(REF_NAME, ""), desc, config_desc, config, layers)
        except LayoutError as exc:
            raise CorruptSnapshot(f"snapshot {ann.get(REF_NAME, desc.digest)}: {exc}") from exc
        # The owner is what this node's index says (the config's namespace is only where it was captured).
        owner = ann.get(fmt.NAMESPACE)
        return replace(snap, namespace=owner) if owner else snap

    def snapshots(self, namespace: str | None = None) -> list[fmt.Snapshot]:
        out = []
        for desc in self._index():
            if namespace is not None and (desc.annotations or {}).get(fmt.NAMESPACE) != namespace:
                continue
            try:
                out.append(self.read(desc))
            except StoreError:
                continue
        return sorted(out, key=lambda s: (s.namespace, s.ref))

    def _annotations(self, snap: fmt.Snapshot, exact: bool = False) -> dict[str, str]:
        """The index annotations of `snap`'s entry (same name, owner and manifest; unless `exact`,
        else the first entry of that manifest)."""
        found: dict[str, str] | None = None
        for desc in self._index():
            ann = desc.annotations or {}
            if desc.digest == snap.manifest.digest:
                if ann.get(REF_NAME) == snap.ref and ann.get(fmt.NAMESPACE) == snap.namespace:
                    return dict(ann)
                found = dict(ann) if found is None and not exact else found
        return found or {}

    def provenance(self, snap: fmt.Snapshot) -> Provenance:
        """Where the snapshot came from (captured here, signature verified, or accepted unsigned);
        an entry from before provenance existed is read from its origin (provenance.from_origin).
        Only the snapshot's own entry counts: another name of the same manifest may have come
        from elsewhere."""
        ann = self._annotations(snap, exact=True)
        if PROVENANCE in ann:
            try:
                return Provenance.from_json(json.loads(ann[PROVENANCE]))
            except ValueError:
                return Provenance.from_json(None)
        return from_origin(ann.get(ORIGIN, ""))

    def signatures(self, snap: fmt.Snapshot) -> list[cosign.Signature]:
        """The cosign signatures known for the snapshot's manifest (verified at pull or import, or
        made by `thaw push --sign`): export carries them."""
        return signatures_from_json(self._annotations(snap).get(SIGNATURES, ""))

    def origin(self, snap: fmt.Snapshot) -> str:
        """How the snapshot came here: "captured", "imported", "pulled:REF" or "migrated"."""
        return self._annotations(snap).get(ORIGIN, "")

    def pushed(self, snap: fmt.Snapshot) -> str:
        """The registry reference the snapshot was last pushed to; "" if never."""
        return self._annotations(snap).get(PUSHED, "")

    def _descriptor(self, ref: SnapshotRef, namespace: str) -> Descriptor | None:
        for desc in self._index():
            ann = desc.annotations or {}
            if ann.get(REF_NAME) == str(ref) and ann.get(fmt.NAMESPACE) == namespace:
                return desc
        return None

    def resolve(self, ref: SnapshotRef, namespace: str, readable_from: tuple[str, ...] = ()) -> fmt.Snapshot:
        """Snapshot `ref` of `namespace`; else of the first namespace in `readable_from` (those
        the node's policy lets publish to this one) that has it."""
        for ns in (namespace, *readable_from):
            desc = self._descriptor(ref, ns)
            if desc is not None:
                return self.read(desc)
        where = namespace + (f" (or {', '.join(readable_from)})" if readable_from else "")
        raise SnapshotNotFound(f"snapshot {ref} not found in namespace {where} of store {self.root}")

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

    # --- the CRIU image directory a restore reads ----------------------------------------------
    def image_path(self, snap: fmt.Snapshot) -> str:
        return os.path.join(self.images_dir, _hex(snap.manifest.digest))

    def _seal_path(self, snap: fmt.Snapshot) -> str:
        return self.image_path(snap) + ".seal"

    def has_images(self, snap: fmt.Snapshot) -> bool:
        """Whether the snapshot's image directory is in place and sealed. One without its seal was
        left by a publish killed between the two: not a snapshot's, the next publish replaces it."""
        return os.path.isdir(self.image_path(snap)) and os.path.exists(self._seal_path(snap))

    @contextlib.contextmanager
    def image_dir(self, snap: fmt.Snapshot, verify: str = "stat") -> Iterator[str]:
        """The snapshot's CRIU image directory, checked against its seal, held (shared lock) until
        the caller is done with it so that no rm or gc removes it mid-restore. A directory that
        fails its seal is checked against the digests: what still matches is sealed again, whole
        files are rebuilt from their verified tar, and a snapshot whose parts are damaged is
        unpublished (so that a capture or pull can replace it) and reported corrupt."""
        path = self.image_path(snap)
        with _flock(path + ".lock", fcntl.LOCK_SH) as fd:
            try:
                self._check_seal(snap, path, verify)
            except CorruptSnapshot:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    self._check_seal(snap, path, verify)    # a concurrent restore repaired it
                except CorruptSnapshot:
                    self._repair(snap, path)
                fcntl.flock(fd, fcntl.LOCK_SH)
            yield path

    def _read_seal(self, snap: fmt.Snapshot) -> dict[str, dict[str, Any]]:
        try:
            with open(self._seal_path(snap)) as f:
                return dict(json.load(f)["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptSnapshot(f"snapshot {snap.ref}: image seal unreadable: {exc}") from exc

    def _check_seal(self, snap: fmt.Snapshot, path: str, verify: str) -> None:
        files = self._read_seal(snap)
        try:
            present = set(os.listdir(path))
        except OSError as exc:
            raise CorruptSnapshot(f"snapshot {snap.ref}: image directory missing: {exc}") from exc
        if present != set(files):
            raise CorruptSnapshot(f"snapshot {snap.ref}: image files differ from its seal "
                                  f"(extra {sorted(present - set(files))[:3]}, missing {sorted(set(files) - present)[:3]})")
        for name, want in files.items():
            st = os.lstat(os.path.join(path, name))
            if st.st_size != want["size"]:
                raise CorruptSnapshot(f"snapshot {snap.ref}: {name} is {st.st_size} bytes, sealed at "
                                      f"{want['size']} (truncated or rewritten)")
            if st.st_mtime_ns != want["mtime_ns"]:
                raise CorruptSnapshot(f"snapshot {snap.ref}: {name} was modified after it was sealed")
        if verify == "digest":
            bad = self._damaged(snap, path, files)
            if bad:
                raise CorruptSnapshot(f"snapshot {snap.ref}: {', '.join(bad[:3])} do not match their digests")

    def _damaged(self, snap: fmt.Snapshot, path: str, files: dict[str, dict[str, Any]]) -> list[str]:
        """The image files whose content does not match the manifest (parts) or the seal's digest
        of the verified tar they came from (whole files); hashed in parallel."""
        parts = {p.file for p in snap.parts}

        def check_part(p: fmt.FilePart) -> str | None:
            try:
                ok = fmt.hash_range(os.path.join(path, p.file), p.offset, p.desc.size) == p.desc.digest
            except (OSError, fmt.SnapshotFormatError):
                ok = False
            return None if ok else p.file

        from concurrent.futures import ThreadPoolExecutor

        def check_whole(name: str) -> str | None:
            try:
                ok = sha256_file(os.path.join(path, name))[0] == (files.get(name) or {}).get("digest")
            except OSError:
                ok = False
            return None if ok else name
        with ThreadPoolExecutor(_workers()) as pool:
            results = list(pool.map(check_part, snap.parts))
            results += list(pool.map(check_whole, [n for n in files if n not in parts]))
        return sorted({r for r in results if r})

    def _repair(self, snap: fmt.Snapshot, path: str) -> None:
        """Caller holds the image lock exclusively."""
        if not os.path.isdir(path):
            self._unpublish_corrupt(snap, "its image directory is gone")
        files = self._read_seal(snap)
        expected = set(files) | {p.file for p in snap.parts}
        for extra in set(os.listdir(path)) - expected:
            os.unlink(os.path.join(path, extra))
        bad = set(self._damaged(snap, path, files)) | (expected - set(os.listdir(path)))
        parts = {p.file for p in snap.parts}
        if bad & parts:
            self._unpublish_corrupt(snap, f"{', '.join(sorted(bad & parts))} do not match the manifest")
        hashes = None
        if bad:
            for name in bad:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            hashes = self._unpack_whole(snap, path, only=bad)   # the new seal carries their digests
        self._write_seal(snap, path, hashes)
        self.report("warning", f"snapshot {snap.ref} ({snap.namespace}): image directory failed its seal; "
                               f"{'rebuilt ' + ', '.join(sorted(bad)) if bad else 'content intact, sealed again'}")

    def _unpublish_corrupt(self, snap: fmt.Snapshot, why: str) -> None:
        with self.locked():
            index = self._index()
            kept = [d for d in index if d.digest != snap.manifest.digest]
            if len(kept) != len(index):
                self.layout.write_index(kept)
                self._changed()
        self.report("error", f"snapshot {snap.ref} ({snap.namespace}) removed: {why}")
        raise CorruptSnapshot(f"snapshot {snap.ref}: {why}; removed from the store")

    def _unpack_whole(self, snap: fmt.Snapshot, path: str, only: set[str] | None = None) -> dict[str, str]:
        """Extract the whole-file tar (verified by digest first) into `path`."""
        try:
            self.layout.verify_blob(snap.criu_whole)
        except LayoutError as exc:
            raise CorruptSnapshot(f"snapshot {snap.ref}: CRIU layer: {exc}") from exc
        with open(self.layout.blob_path(snap.criu_whole.digest), "rb") as f:
            if only is None:
                return fmt.unpack_whole_files(f, path, snap.criu_whole.size)
            tmp = path + ".repair"
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp, 0o700)
            try:
                hashes = fmt.unpack_whole_files(f, tmp, snap.criu_whole.size)
                for name in only:
                    if name in hashes:
                        os.rename(os.path.join(tmp, name), os.path.join(path, name))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return hashes

    def _write_seal(self, snap: fmt.Snapshot, path: str, hashes: dict[str, str] | None = None) -> None:
        old = {}
        with contextlib.suppress(CorruptSnapshot):
            old = self._read_seal(snap)
        files = {}
        for name in sorted(os.listdir(path)):
            st = os.lstat(os.path.join(path, name))
            digest = (hashes or {}).get(name) or (old.get(name) or {}).get("digest")
            files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest}
        atomic_write(self._seal_path(snap), json.dumps({"manifest": snap.manifest.digest, "files": files}).encode())

    def touch(self, snap: fmt.Snapshot) -> None:
        """Record a use (the node cache's least-recently-used order)."""
        with contextlib.suppress(OSError):
            os.utime(self.image_path(snap) + ".lock")

    # --- the node cache: sizes, last use, eviction ------------------------------------------------
    def _layout_blobs(self, snap: fmt.Snapshot) -> set[str]:
        """The digests of `snap`'s blobs kept in the layout (its file parts are not: they are
        byte ranges of its image directory)."""
        return {d.digest for d in (snap.manifest, snap.config_desc, snap.criu_whole, snap.rootfs, snap.deleted)}

    def _held(self, snap: fmt.Snapshot) -> dict[str, int]:
        """What `snap` holds on disk -> its bytes: each layout blob by digest, and its image
        directory with its seal as "images/<hex>"."""
        out = {digest: _file_bytes(self.layout.blob_path(digest)) for digest in self._layout_blobs(snap)}
        path = self.image_path(snap)
        out["images/" + _hex(snap.manifest.digest)] = _tree_bytes(path) + _file_bytes(path + ".seal")
        return out

    def size(self, snap: fmt.Snapshot) -> int:
        """Bytes on disk that `snap` holds: its blobs in the layout (manifest, config, whole-file
        tar, rootfs diff, deleted list) plus its CRIU image directory and seal; apparent file
        sizes. A blob shared with other snapshots counts for each of them, so the sizes of
        several snapshots can add up to more than the store holds (total_bytes counts it once)."""
        return sum(self._held(snap).values())

    def last_used(self, snap: fmt.Snapshot) -> float | None:
        """When `snap` was last restored (the mtime of its image lock, which touch() sets), else
        when it was published (its seal's mtime); None if neither exists."""
        path = self.image_path(snap)
        for p in (path + ".lock", path + ".seal"):
            with contextlib.suppress(OSError):
                return os.stat(p).st_mtime
        return None

    def total_bytes(self) -> int:
        """Bytes on disk that the published snapshots hold together, each file counted once."""
        held: dict[str, int] = {}
        for snap in self.snapshots():
            held.update(self._held(snap))
        return sum(held.values())

    def evict(self, max_bytes: int, evict_unpushed: bool = False) -> list[Evicted]:
        """Remove least recently used snapshots until the published ones hold at most `max_bytes`
        (0: unbounded, nothing is removed). Never one a restore is reading; unless
        `evict_unpushed`, only those that can be fetched again (pulled, or pushed since). Each
        removal goes to the events log; so does, once, why the store stays over `max_bytes` if
        nothing more may go."""
        if max_bytes <= 0:
            return []
        with self.locked():
            evicted = self._evict_locked(max_bytes, evict_unpushed)
            if evicted:
                self._gc_locked()
                self._changed()
        return evicted

    def _evict_locked(self, max_bytes: int, evict_unpushed: bool, keep: str = "") -> list[Evicted]:
        """evict() for a caller holding the store lock, who then runs _gc_locked (which deletes
        the blobs the evicted snapshots alone held) and _changed. `keep`: a manifest digest never
        to evict (the snapshot just published)."""
        index = self._index()
        snaps: list[Entry] = []
        for desc in index:
            with contextlib.suppress(StoreError):
                snap = self.read(desc)
                snaps.append((desc, snap, self._held(snap)))

        def total(entries: list[Entry]) -> int:
            return sum({k: v for _d, _s, held in entries for k, v in held.items()}.values())
        live = list(snaps)
        now_total = total(live)
        evicted: list[Evicted] = []
        in_use: list[str] = []
        unpushed: list[str] = []
        kept = False
        by_age = sorted(snaps, key=lambda e: (self.last_used(e[1]) or 0.0, e[1].namespace, e[1].ref))
        for entry in by_age:
            if now_total <= max_bytes:
                break
            desc, snap, _held = entry
            name = f"{snap.ref} ({snap.namespace})"
            ann = desc.annotations or {}
            if snap.manifest.digest == keep:
                kept = True
                continue
            if not evict_unpushed and not (ann.get(ORIGIN, "").startswith("pulled:") or ann.get(PUSHED)):
                unpushed.append(name)
                continue
            used = self.last_used(snap)
            path = self.image_path(snap)
            with _flock_if_free(path + ".lock") as free:
                if not free:
                    in_use.append(name)          # a restore reads it
                    continue
                live.remove(entry)
                index = [d for d in index if d is not desc]
                self.layout.write_index(index)   # unpublished first: never an entry without its files
                if not any(s.manifest.digest == snap.manifest.digest for _d, s, _h in live):
                    self._remove_image_dir_held(path)
            after = total(live)
            evicted.append(Evicted(snap.ref, snap.namespace, snap.manifest.digest, now_total - after))
            now_total = after
            when = "unknown" if used is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(used))
            self.report("info", f"snapshot {name} evicted from the node cache (least recently used, last "
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
            self.report("warning", f"store holds {now_total} bytes, over store.max_bytes {max_bytes}; "
                                   f"nothing more may be evicted ({'; '.join(why) or 'no snapshot left'})")
        return evicted

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

    def _entries(self) -> list[Entry]:
        out = []
        for desc in self._index():
            with contextlib.suppress(StoreError):
                snap = self.read(desc)
                out.append((desc, snap, self._held(snap)))
        return out

    def _charged(self, entries: list[Entry], namespace: str, extra: dict[str, int] | None = None) -> int:
        held: dict[str, int] = dict(extra or {})
        for _d, snap, h in entries:
            if self.charged_to(snap) == namespace:
                held.update(h)
        return sum(held.values())

    def usage(self, namespace: str) -> int:
        """Bytes charged to `namespace`: its snapshots' files (each once) and its pulls in progress."""
        with self.locked():
            return self._charged(self._entries(), namespace) + self._pull_claims().get(namespace, 0)

    def claim_pull(self, area: str, namespace: str, nbytes: int, what: str) -> list[Evicted]:
        """Before a pull writes anything: charge `nbytes` (what its manifest declares) to
        `namespace` for as long as `area` is held, evicting that namespace's own least recently
        used snapshots if needed. QuotaExceeded if it cannot fit."""
        with self.locked():
            evicted = self._make_room_locked(namespace, {"pull:" + area: nbytes}, "", area, what)
            atomic_write(os.path.join(area, CLAIM),
                         json.dumps({"namespace": namespace, "bytes": nbytes}).encode(), durable=False)
            if evicted:
                self._gc_locked()
                self._changed()
        return evicted

    def check_room(self, namespace: str, nbytes: int, what: str) -> None:
        """QuotaExceeded now if `nbytes` more could not fit `namespace` even after evicting what
        it may (an import checks before it writes; its publish then evicts for real)."""
        with self.locked():
            self._make_room_locked(namespace, {"new:" + what: nbytes}, "", None, what, dry_run=True)

    def _make_room_locked(self, namespace: str, new: dict[str, int], keep: str, exclude_area: str | None,
                          what: str, dry_run: bool = False) -> list[Evicted]:
        """Make `new` (file key -> bytes) fit `namespace`'s quota and store.max_bytes, evicting
        only `namespace`'s own snapshots, least recently used first: never `keep`, one a
        restore reads, one whose files all stay held by a kept snapshot, nor (unless
        store.evict_unpushed) one no registry holds. Caller holds the store lock and runs
        _gc_locked after. Raises QuotaExceeded, having evicted nothing, if it cannot fit."""
        limits = self._limits()
        if limits is None:
            return []
        quota, max_bytes = self.quota_of(namespace), int(limits.max_bytes)
        claims = self._pull_claims(exclude_area)
        index = self._index()
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
                     key=lambda e: (self.last_used(e[1]) or 0.0, e[1].ref))
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
            unpushed = [e for e in group if not limits.evict_unpushed and not (
                (e[0].annotations or {}).get(ORIGIN, "").startswith("pulled:") or (e[0].annotations or {}).get(PUSHED))]
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
            if not _lock_free(self.image_path(entry[1]) + ".lock"):
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
            path = self.image_path(snap)
            with _flock_if_free(path + ".lock") as free:
                if not free:        # a restore started since: keep it, and count it again
                    entries.append(next(e for e in full if e[0] is desc))
                    continue
                index = [d for d in index if d != desc]
                self.layout.write_index(index)  # unpublished first: never an entry without its files
                if not any(d.digest == snap.manifest.digest for d in index):
                    self._remove_image_dir_held(path)
            evicted.append(Evicted(snap.ref, snap.namespace, snap.manifest.digest, freed))
            self.report("info", f"snapshot {snap.ref} ({snap.namespace}) evicted (least recently used of its "
                                f"namespace) to make room for {what}")
        if over():
            raise QuotaExceeded(f"{what}: a restore started on a snapshot chosen for eviction; try again")
        return evicted

    # --- publishing and removing ------------------------------------------------------------------
    def publish(self, snap: fmt.Snapshot, staged_images: str, origin: str,
                hashes: dict[str, str] | None = None, pull_area: str | None = None,
                provenance: Provenance | None = None, signatures: list[cosign.Signature] | tuple[cosign.Signature, ...] = ()) -> fmt.Snapshot:
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
                self._remove_image_dir(target)          # under the store lock: its publish is dead
            hexd = "images/" + _hex(snap.manifest.digest)
            new = {d.digest: d.size for d in (snap.manifest, snap.config_desc, snap.criu_whole, snap.rootfs,
                                              snap.deleted)}
            new[hexd] = (_tree_bytes(target) + _file_bytes(target + ".seal")) if os.path.isdir(target) \
                else _tree_bytes(staged_images)
            self._make_room_locked(self.charged_to(snap), new, snap.manifest.digest, pull_area,
                                   f"publishing {snap.ref} ({snap.namespace})")
            if not os.path.isdir(target):
                for name in os.listdir(staged_images):
                    os.chmod(os.path.join(staged_images, name), 0o400)
                os.chmod(staged_images, 0o700)
                os.rename(staged_images, target)
                faults.point("image_dir_moved")     # the tests kill a publish here
                self._write_seal(snap, target, hashes)
            index, pushed = [], ""
            for d in self._index():
                ann = d.annotations or {}
                if ann.get(REF_NAME) == snap.ref and ann.get(fmt.NAMESPACE) == snap.namespace:
                    # The registry still holds what was pushed only if this is that manifest.
                    pushed = ann.get(PUSHED, "") if d.digest == snap.manifest.digest else ""
                    continue
                index.append(d)
            entry = fmt.index_entry(snap)
            ann = {**(entry.annotations or {}), ORIGIN: origin, **({PUSHED: pushed} if pushed else {}),
                   PROVENANCE: json.dumps(prov.to_json()),
                   **({SIGNATURES: signatures_json(list(signatures))} if signatures else {})}
            index.append(replace(entry, annotations=ann))
            self.layout.write_index(index)
            self._gc_locked()
            self._changed()
        return snap

    def mark_pushed(self, snap: fmt.Snapshot, ref: str) -> None:
        """Record that the registry holds `snap` at `ref` (it may then be evicted from the node
        cache: it can be pulled again). Nothing happens if the snapshot is no longer published."""
        with self.locked():
            index = self._index()
            if not any(d.digest == snap.manifest.digest for d in index):
                return
            self.layout.write_index([replace(d, annotations={**(d.annotations or {}), PUSHED: ref})
                                     if d.digest == snap.manifest.digest else d for d in index])

    def add_signature(self, snap: fmt.Snapshot, signature: cosign.Signature) -> None:
        """Keep a signature made for `snap`'s manifest (`thaw push --sign`) with every entry of it."""
        with self.locked():
            index = self._index()
            out = []
            for d in index:
                if d.digest == snap.manifest.digest:
                    ann = dict(d.annotations or {})
                    sigs = signatures_from_json(ann.get(SIGNATURES, ""))
                    if signature not in sigs:
                        ann[SIGNATURES] = signatures_json([*sigs, signature])
                    d = replace(d, annotations=ann)
                out.append(d)
            self.layout.write_index(out)

    def remove(self, ref: SnapshotRef, namespace: str) -> None:
        with self.locked():
            index = self._index()
            kept = [d for d in index if not ((d.annotations or {}).get(REF_NAME) == str(ref)
                                             and (d.annotations or {}).get(fmt.NAMESPACE) == namespace)]
            if len(kept) == len(index):
                raise SnapshotNotFound(f"snapshot {ref} not found in namespace {namespace} of store {self.root}")
            self.layout.write_index(kept)
            self._gc_locked()
            self._changed()

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
        for desc in self._index():
            live_blobs.add(desc.digest)
            live_images.add(_hex(desc.digest))
            with contextlib.suppress(StoreError):
                live_blobs.update(d.digest for d in self.read(desc).blobs)
        freed = self._reap_staging()
        live_blobs |= self._live_staging()
        freed += self._gc_pulls()
        blob_dir = os.path.join(self.layout.root, "blobs", "sha256")
        for name in os.listdir(blob_dir):
            if name.startswith(".") or "sha256:" + name not in live_blobs:
                freed += _unlink(os.path.join(blob_dir, name))
        for name in os.listdir(self.images_dir):
            hexd = name.split(".", 1)[0]
            if hexd in live_images:
                continue
            path = os.path.join(self.images_dir, name)
            if os.path.isdir(path):
                freed += self._remove_image_dir(path)
            elif not os.path.exists(os.path.join(self.images_dir, hexd)):
                freed += _unlink(path)    # seals and locks of directories already gone
        return freed

    def _remove_image_dir(self, path: str) -> int:
        """Remove an image directory, its seal and lock unless a restore holds it; bytes freed."""
        with _flock_if_free(path + ".lock") as free:
            # not free: a restore reads it, a later gc removes it
            return self._remove_image_dir_held(path) if free else 0

    @staticmethod
    def _remove_image_dir_held(path: str) -> int:
        """The caller holds path.lock exclusively."""
        freed = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        return freed + sum(_unlink(path + suffix) for suffix in (".seal", ".lock"))

    def _reap_staging(self) -> int:
        """Remove the staging areas whose owner process is gone; returns the bytes freed."""
        freed = 0
        for name in os.listdir(self.staging_dir):
            path = os.path.join(self.staging_dir, name)
            try:
                with open(os.path.join(path, ".owner")) as f:
                    owner = ProcessHandle.from_json(json.load(f))
            except (OSError, ValueError):
                owner = None
            if owner is None or not owner.alive():
                freed += _tree_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
        return freed

    def _live_staging(self) -> set[str]:
        """Digests that the staging areas (of live owners: _reap_staging ran first) have written."""
        keep: set[str] = set()
        for name in os.listdir(self.staging_dir):
            with contextlib.suppress(OSError), open(os.path.join(self.staging_dir, name, ".blobs")) as f:
                keep.update(line.strip() for line in f if line.strip())
        return keep

    def _changed(self) -> None:
        """The published set changed (caller holds the lock): rewrite the store gauges."""
        if self._cfg is None or not self._cfg.metrics_dir:
            return
        from . import metrics
        snaps = self.snapshots()
        blobs = {d.digest: d.size for s in snaps for d in s.blobs}
        metrics.record_store(self._cfg, len(snaps), sum(blobs.values()))

    def report(self, level: str, msg: str) -> None:
        """A store event (repairs, removals) in the node's events log."""
        if self._cfg is not None:
            from . import events
            events.emit(self._cfg, "store", msg, level=level)

    # --- export / import ------------------------------------------------------------------------
    def export(self, ref: SnapshotRef, namespace: str, out_path: str, verify: str = "digest") -> fmt.Snapshot:
        snap = self.resolve(ref, namespace)
        for d in (snap.criu_whole, snap.rootfs, snap.deleted):
            try:
                self.layout.verify_blob(d)
            except LayoutError as exc:
                raise CorruptSnapshot(f"snapshot {ref}: {exc}") from exc
        from thaw.oci import cosign
        signatures = self.signatures(snap)
        attached = [(cosign.tag_for(snap.manifest.digest), *cosign.manifest(signatures))] if signatures else []
        with self.image_dir(snap, verify):
            fmt.write_archive([snap], lambda d: self.open_blob(snap, d), out_path, attached)
        return snap


class _NotingLayout(ImageLayout):
    """The store's layout as a staging area writes to it: every blob is noted in the staging
    area's .blobs (so a concurrent gc leaves it alone) and its temp file lives in the staging
    area (so a dead writer's leftovers go with its area)."""

    def __init__(self, base: ImageLayout, staging: str):
        super().__init__(base.root)
        self._staging = staging

    def new_blob_file(self) -> tuple[IO[bytes], str]:
        fd, tmp = _mkstemp(self._staging)
        return os.fdopen(fd, "wb"), tmp

    def commit_blob(self, tmp: str, digest: str, expected: str | None = None) -> str:
        with open(os.path.join(self._staging, ".blobs"), "a") as f:
            f.write(digest + "\n")
        return super().commit_blob(tmp, digest, expected)


def _mkstemp(directory: str) -> tuple[int, str]:
    path = os.path.join(directory, f".blob-{uuid.uuid4().hex}")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path


class Staging:
    """One capture, import or conversion in progress: blobs go to the layout (noted), CRIU
    image directories are built in its own directories, nothing is visible until published."""

    def __init__(self, store: Store, path: str):
        self.store, self.path = store, path
        self.layout = _NotingLayout(store.layout, path)

    def new_dir(self, name: str) -> str:
        path = os.path.join(self.path, name)
        os.mkdir(path, 0o700)
        return path

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        return self.layout.put_bytes(data, media_type)

    def put_stream(self, writer_fn: Callable[[HashingWriter], None], media_type: str) -> Descriptor:
        """A blob produced by writer_fn(stream) (e.g. a tar writer), hashed as it is written."""
        f, tmp = self.layout.new_blob_file()
        try:
            with f:
                w = HashingWriter(f)
                writer_fn(w)
                f.flush()
                os.fsync(f.fileno())
            self.layout.commit_blob(tmp, w.digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return Descriptor(media_type, w.digest, w.size)

    def package_images(self, images: str) -> tuple[Descriptor, list[fmt.FilePart], dict[str, str], int]:
        """Describe a CRIU image directory as layers without copying it: small files go into the
        whole-file tar, large ones become file parts hashed in parallel (pread per range).
        Returns (tar descriptor, parts, digests of the whole files, total bytes)."""
        from concurrent.futures import ThreadPoolExecutor
        sizes = {n: os.path.getsize(os.path.join(images, n)) for n in fmt.criu_dir_entries(images)}
        whole, ranges = fmt.split_for_parts(sizes)
        with ThreadPoolExecutor(_workers()) as pool:
            part_digests = [pool.submit(fmt.hash_range, os.path.join(images, name), off, n)
                            for name, off, n in ranges]
            whole_digests = {n: pool.submit(lambda p: sha256_file(p)[0], os.path.join(images, n)) for n in whole}
            tar = self.put_stream(lambda w: fmt.pack_whole_files(images, whole, w), fmt.CRIU_WHOLE_LAYER)
            parts = [fmt.FilePart(name, off, Descriptor(fmt.CRIU_PART_LAYER, fut.result(), n))
                     for (name, off, n), fut in zip(ranges, part_digests)]
            hashes = {n: fut.result() for n, fut in whole_digests.items()}
        return tar, parts, hashes, sum(sizes.values())

    def write_snapshot(self, config: fmt.SnapshotConfig, whole: Descriptor, parts: list[fmt.FilePart],
                       rootfs: Descriptor, deleted: Descriptor) -> fmt.Snapshot:
        """Write config and manifest blobs (not yet published)."""
        config = fmt.SnapshotConfig.from_json(config.to_json())     # its creation time fixed
        config_desc = self.put_bytes(config.blob(), fmt.CONFIG_MEDIA_TYPE)
        manifest = self.put_bytes(fmt.manifest_blob(config, config_desc, whole, parts, rootfs, deleted),
                                  fmt.MANIFEST_MEDIA_TYPE)
        return fmt.Snapshot(config.ref, config.namespace, manifest, config_desc, config, whole,
                            tuple(parts), rootfs, deleted)

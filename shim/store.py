"""The snapshot store: the one owner of store_dir.

  store_dir/layout/              OCI image layout; index.json names the published snapshots
  store_dir/layers/<hex>/        each CRIU layer unpacked (what restore reads), keyed by digest
  store_dir/layers/<hex>.seal    what the unpacked layer held when it was made: per file size,
                                 mtime and sha256; restore checks it before trusting the layer
  store_dir/staging/<id>/        captures and imports in progress (never visible as snapshots)
  store_dir/.lock                flock serialising index changes and garbage collection

A snapshot becomes visible only when index.json is replaced with one naming it, after all its
blobs are in place and verified. Everything is root-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from typing import Iterator

from thaw.oci import ThawError
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.files import atomic_write, make_private_dir
from thaw.oci.layout import REF_NAME, Descriptor, HashingReader, HashingWriter, ImageLayout, LayoutError, sha256_file


class StoreError(ThawError):
    pass


class SnapshotNotFound(StoreError):
    pass


class CorruptSnapshot(StoreError):
    pass


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _file_digest(path: str) -> str:
    return sha256_file(path)[0]


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


class Store:
    def __init__(self, root: str, cfg=None):
        self.root = root
        self.layout = ImageLayout(os.path.join(root, "layout"))
        self.layers_dir = os.path.join(root, "layers")
        self.staging_dir = os.path.join(root, "staging")
        self._cfg = cfg                  # the node config: store gauges go to its metrics_dir

    @classmethod
    def for_config(cls, cfg) -> "Store":
        """The node's store, reporting its size to the node's metrics."""
        return cls(cfg.store_dir, cfg)

    def _changed(self) -> None:
        """The published set changed (caller holds the lock): rewrite the store gauges."""
        if self._cfg is None or not self._cfg.metrics_dir:
            return
        from . import metrics
        snaps = self.snapshots()
        blobs = {d.digest: d.size for s in snaps for d in s.blobs}
        metrics.record_store(self._cfg, len(snaps), sum(blobs.values()))

    # --- setup and locking --------------------------------------------------------------------
    def init(self) -> "Store":
        for d in (self.root, self.layers_dir, self.staging_dir):
            make_private_dir(d)
        os.chmod(self.root, 0o700)
        self.layout.init()
        return self

    def locked(self):
        """Serialises index changes and garbage collection."""
        return _flock(os.path.join(self.root, ".lock"))

    def name_lock(self, ref: SnapshotRef):
        """Serialises captures of one snapshot name across processes (auto-capture)."""
        return _flock(os.path.join(make_private_dir(os.path.join(self.root, "locks")),
                                   f"{ref.name}_{ref.tag}.lock"))

    @contextlib.contextmanager
    def staging(self, kind: str) -> Iterator[str]:
        """A private working directory inside the store (same file system as the layout)."""
        self.init()
        path = os.path.join(self.staging_dir, f"{kind}-{uuid.uuid4().hex[:12]}")
        os.mkdir(path, 0o700)
        with open(os.path.join(path, ".pid"), "w") as f:
            f.write(str(os.getpid()))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # --- reading --------------------------------------------------------------------------------
    def snapshots(self) -> list[fmt.Snapshot]:
        if not os.path.exists(self.layout.index_path):
            return []
        out = []
        for desc in self.layout.read_index():
            try:
                out.append(fmt.read_snapshot(self.layout, desc))
            except LayoutError:
                continue
        return sorted(out, key=lambda s: s.ref)

    def _descriptor(self, ref: SnapshotRef) -> Descriptor:
        for desc in self.layout.read_index() if os.path.exists(self.layout.index_path) else []:
            if (desc.annotations or {}).get(REF_NAME) == str(ref):
                return desc
        raise SnapshotNotFound(f"snapshot {ref} not found in store {self.root}")

    def resolve(self, ref: SnapshotRef) -> fmt.Snapshot:
        desc = self._descriptor(ref)
        try:
            return fmt.read_snapshot(self.layout, desc)
        except LayoutError as exc:
            raise CorruptSnapshot(f"snapshot {ref}: {exc}") from exc

    def deleted_paths(self, snap: fmt.Snapshot) -> list[str]:
        try:
            return fmt.read_deleted(self.layout, snap)
        except (LayoutError, ValueError) as exc:
            raise CorruptSnapshot(f"snapshot {snap.ref}: deleted-files layer: {exc}") from exc

    def open_rootfs_layer(self, snap: fmt.Snapshot):
        """The rootfs diff layer, verified by digest first (it is small and applied into a rootfs)."""
        try:
            self.layout.verify_blob(snap.rootfs)
        except LayoutError as exc:
            raise CorruptSnapshot(f"snapshot {snap.ref}: rootfs layer: {exc}") from exc
        return open(self.layout.blob_path(snap.rootfs.digest), "rb")

    # --- the unpacked CRIU layer --------------------------------------------------------------
    def _seal_path(self, digest: str) -> str:
        return os.path.join(self.layers_dir, _hex(digest) + ".seal")

    def _write_seal(self, digest: str, path: str, hashes: dict[str, str]) -> None:
        files = {}
        for name in sorted(os.listdir(path)):
            st = os.lstat(os.path.join(path, name))
            files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": hashes.get(name)}
        atomic_write(self._seal_path(digest), json.dumps({"digest": digest, "files": files}).encode())

    def _check_seal(self, digest: str, path: str, verify: str) -> None:
        try:
            with open(self._seal_path(digest)) as f:
                seal = json.load(f)
            files = seal["files"]
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptSnapshot(f"cached layer {digest}: seal unreadable: {exc}") from exc
        present = set(os.listdir(path))
        if present != set(files):
            raise CorruptSnapshot(f"cached layer {digest}: files differ from its seal "
                                  f"(extra {sorted(present - set(files))[:3]}, missing {sorted(set(files) - present)[:3]})")
        for name, want in files.items():
            st = os.lstat(os.path.join(path, name))
            if st.st_size != want["size"]:
                raise CorruptSnapshot(f"cached layer {digest}: {name} is {st.st_size} bytes, sealed at "
                                      f"{want['size']} (truncated or rewritten)")
            if st.st_mtime_ns != want["mtime_ns"]:
                raise CorruptSnapshot(f"cached layer {digest}: {name} was modified after it was sealed")
            if verify == "digest":
                if _file_digest(os.path.join(path, name)) != want.get("digest"):
                    raise CorruptSnapshot(f"cached layer {digest}: {name} does not match its digest")

    def cached_layer(self, snap: fmt.Snapshot, verify: str = "stat") -> str:
        """Path of the unpacked CRIU layer, checked against its seal; unpacked from the
        (digest-verified) blob first if it is not cached."""
        path = os.path.join(self.layers_dir, _hex(snap.criu.digest))
        if not os.path.isdir(path):
            self._unpack_criu(snap.criu)
        self._check_seal(snap.criu.digest, path, verify)
        return path

    def _unpack_criu(self, desc: Descriptor) -> None:
        tmp = tempfile.mkdtemp(prefix=".unpack-", dir=self.layers_dir)
        try:
            with open(self.layout.blob_path(desc.digest), "rb") as raw:
                reader = HashingReader(raw)
                hashes = fmt.unpack_criu_layer(reader, tmp)
                reader.drain()
            if reader.digest != desc.digest or reader.size != desc.size:
                raise CorruptSnapshot(f"CRIU layer blob {desc.digest} does not match its digest")
            self._write_seal(desc.digest, tmp, hashes)
            try:
                os.rename(tmp, os.path.join(self.layers_dir, _hex(desc.digest)))
            except OSError:
                if not os.path.isdir(os.path.join(self.layers_dir, _hex(desc.digest))):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)   # a concurrent restore unpacked it first
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CorruptSnapshot(f"cannot unpack CRIU layer {desc.digest}: {exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # --- writing --------------------------------------------------------------------------------
    def staged_layout(self, staging: str) -> ImageLayout:
        """The layout, as seen by a staging operation: every blob written is noted in the staging
        dir so that a concurrent garbage collection leaves it alone until it is published."""
        return _NotingLayout(self.layout, staging)

    def add_criu_dir(self, staging: str, image_dir: str) -> Descriptor:
        """Pack a CRIU image directory as a layer blob and adopt the directory itself as the
        layer's cache (same file system: a rename), sealed."""
        from concurrent.futures import ThreadPoolExecutor
        # The seal's per-file hashes are computed by other threads while this one writes and
        # hashes the tar stream (hashlib and file reads release the GIL): two passes in parallel.
        with ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) - 1))) as pool:
            futures = {n: pool.submit(_file_digest, os.path.join(image_dir, n))
                       for n in fmt.criu_dir_entries(image_dir)}
            desc = self.add_stream_blob(staging, lambda w: fmt.pack_criu_dir(image_dir, w), fmt.CRIU_LAYER)
            hashes = {n: fut.result() for n, fut in futures.items()}
        cache = os.path.join(self.layers_dir, _hex(desc.digest))
        if not os.path.isdir(cache):
            self._write_seal(desc.digest, image_dir, hashes)
            os.chmod(image_dir, 0o700)
            os.rename(image_dir, cache)
        return desc

    def add_stream_blob(self, staging: str, writer_fn, media_type: str) -> Descriptor:
        """A blob produced by writer_fn(stream) (e.g. a tar writer), hashed as it is written."""
        layout = self.staged_layout(staging)
        f, tmp = layout.new_blob_file()
        try:
            with f:
                w = HashingWriter(f)
                writer_fn(w)
                f.flush()
                os.fsync(f.fileno())
            layout.commit_blob(tmp, w.digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return Descriptor(media_type, w.digest, w.size)

    def publish(self, snap: fmt.Snapshot) -> None:
        """Make `snap` visible under its ref (replacing an older snapshot of the same ref)."""
        for d in snap.blobs:
            if not self.layout.has_blob(d):
                raise StoreError(f"cannot publish {snap.ref}: blob {d.digest} missing")
        with self.locked():
            index = [d for d in self.layout.read_index()
                     if (d.annotations or {}).get(REF_NAME) != snap.ref]
            index.append(Descriptor(fmt.MANIFEST_MEDIA_TYPE, snap.manifest.digest, snap.manifest.size,
                                    {REF_NAME: snap.ref}))
            self.layout.write_index(index)
            self._gc_locked()
            self._changed()

    def remove(self, ref: SnapshotRef) -> None:
        with self.locked():
            index = self.layout.read_index()
            kept = [d for d in index if (d.annotations or {}).get(REF_NAME) != str(ref)]
            if len(kept) == len(index):
                raise SnapshotNotFound(f"snapshot {ref} not found in store {self.root}")
            self.layout.write_index(kept)
            self._gc_locked()
            self._changed()

    def _gc_locked(self) -> None:
        """Delete blobs and cached layers no published snapshot references, and staging dirs
        whose owner process is gone. Caller holds the lock."""
        live: set[str] = set()
        for desc in self.layout.read_index():
            live.add(desc.digest)
            try:
                live.update(d.digest for d in fmt.read_snapshot(self.layout, desc).blobs)
            except LayoutError:
                pass
        staged = self._live_staging()
        for digest in list(self.layout.all_blobs()):
            if digest not in live and digest not in staged:
                try:
                    os.unlink(self.layout.blob_path(digest))
                except FileNotFoundError:
                    pass
        for name in os.listdir(self.layers_dir):
            hexd = name[:-5] if name.endswith(".seal") else name
            if name.startswith("."):
                continue
            if "sha256:" + hexd not in live and "sha256:" + hexd not in staged:
                p = os.path.join(self.layers_dir, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)

    def _live_staging(self) -> set[str]:
        """Digests that in-progress captures/imports (live owner pid) have written but not published;
        removes staging dirs of dead owners."""
        keep: set[str] = set()
        for name in os.listdir(self.staging_dir):
            path = os.path.join(self.staging_dir, name)
            try:
                pid = int(open(os.path.join(path, ".pid")).read())
                os.kill(pid, 0)
            except (OSError, ValueError):
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                with open(os.path.join(path, ".blobs")) as f:
                    keep.update(line.strip() for line in f if line.strip())
            except OSError:
                pass
        return keep

    @staticmethod
    def note_staged(staging: str, digest: str) -> None:
        """Record that a staging operation wrote `digest` (protects it from a concurrent gc)."""
        with open(os.path.join(staging, ".blobs"), "a") as f:
            f.write(digest + "\n")

    # --- export / import ------------------------------------------------------------------------
    def export(self, ref: SnapshotRef, out_path: str) -> fmt.Snapshot:
        snap = self.resolve(ref)
        for d in snap.layers:
            try:
                self.layout.verify_blob(d)
            except LayoutError as exc:
                raise CorruptSnapshot(f"snapshot {ref}: {exc}") from exc
        fmt.write_archive(self.layout, snap, out_path)
        return snap

    def import_archive(self, path: str) -> list[fmt.Snapshot]:
        """Import an OCI archive: every blob verified against its digest, every CRIU layer
        unpacked and sealed, then the snapshots published."""
        self.init()
        with self.staging("import") as staging:
            # Blobs land in the layout directly (content-addressed, verified, unreachable until
            # published); the staging record keeps a concurrent gc off them.
            try:
                snaps = fmt.read_archive(path, self.staged_layout(staging))
            except (LayoutError, OSError) as exc:
                raise CorruptSnapshot(f"import of {path} failed: {exc}") from exc
            for snap in snaps:
                if not os.path.isdir(os.path.join(self.layers_dir, _hex(snap.criu.digest))):
                    self._unpack_criu(snap.criu)
            for snap in snaps:
                self.publish(snap)
        return snaps


class _NotingLayout(ImageLayout):
    """An ImageLayout view that records each blob it writes in a staging dir's .blobs file."""

    def __init__(self, base: ImageLayout, staging: str):
        super().__init__(base.root)
        self._staging = staging

    def commit_blob(self, tmp: str, digest: str, expected: str | None = None) -> str:
        Store.note_staged(self._staging, digest)
        return super().commit_blob(tmp, digest, expected)

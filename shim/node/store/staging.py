"""The store's work areas, never visible as snapshots:

  store_dir/staging/<id>/      captures, imports and conversions in progress (owner process and
                               the blobs written so far)
  store_dir/pulls/<hex>/       a pull of manifest sha256:<hex> in progress (CRIU files being
                               filled, small blobs, its resume journal, .claim: the namespace
                               charged and the bytes its manifest declares), locked by
                               pulls/<hex>.lock while a pull runs; removed when the pull ends,
                               however it ends; gc removes one whose pull process is gone"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from thaw.oci import snapshot as fmt
from thaw.oci.digest import HashingWriter, of_file
from thaw.oci.files import atomic_write, make_private_dir
from thaw.oci.layout import Descriptor, ImageLayout

from ...drivers.procs import ProcessHandle
from .files import flock_if_free, flock_polled, hex_of, tree_bytes, workers

CLAIM = ".claim"                    # in a pull area: {"namespace", "bytes"} the pull is charged


class WorkAreas:
    """store_dir/staging/ and store_dir/pulls/: who works in each, what each has written or
    claimed, and their removal once their owner is gone."""

    def __init__(self, root: str, staging_dir: str, layout: ImageLayout):
        self.staging_dir = staging_dir
        self.pulls_dir = os.path.join(root, "pulls")
        self.layout = layout

    # --- staging ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, kind: str) -> Iterator[Staging]:
        """A private working area inside the store (same file system as everything published).
        The store's directories exist (the store makes them)."""
        path = os.path.join(self.staging_dir, f"{kind}-{uuid.uuid4().hex[:12]}")
        os.mkdir(path, 0o700)
        atomic_write(os.path.join(path, ".owner"), json.dumps(ProcessHandle.me().to_json()).encode(),
                     durable=False)
        try:
            yield Staging(self.layout, path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def reap_staging(self) -> int:
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
                freed += tree_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
        return freed

    def live_staging(self) -> set[str]:
        """Digests that the staging areas (of live owners: reap_staging ran first) have written."""
        keep: set[str] = set()
        for name in os.listdir(self.staging_dir):
            with contextlib.suppress(OSError), open(os.path.join(self.staging_dir, name, ".blobs")) as f:
                keep.update(line.strip() for line in f if line.strip())
        return keep

    # --- pulls --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pull_area(self, digest: str, cancelled: Callable[[], bool] | None = None) -> Iterator[str]:
        """store_dir/pulls/<hex>/ for a pull of manifest `digest`, exclusively the caller's until
        it is done (a second pull of the same manifest waits here, until `cancelled()`).
        Removed when the caller finishes, whether it succeeded or failed: what a failed pull
        wrote is given back at once."""
        pulls = make_private_dir(self.pulls_dir)
        hexd = hex_of(digest)
        with flock_polled(os.path.join(pulls, hexd + ".lock"), cancelled):
            area = make_private_dir(os.path.join(pulls, hexd))
            try:
                yield area
            finally:
                shutil.rmtree(area, ignore_errors=True)

    @staticmethod
    def claim(area: str, namespace: str, nbytes: int) -> None:
        """Record in the pull area what it is charged (the caller has made room for it)."""
        atomic_write(os.path.join(area, CLAIM),
                     json.dumps({"namespace": namespace, "bytes": nbytes}).encode(), durable=False)

    def gc_pulls(self) -> int:
        """Remove every pull area no pull process holds (its owner is gone); bytes freed."""
        pulls = self.pulls_dir
        freed = 0
        for name in os.listdir(pulls) if os.path.isdir(pulls) else []:
            path = os.path.join(pulls, name)
            if name.endswith(".lock") or not os.path.isdir(path):
                continue
            with flock_if_free(path + ".lock") as free:   # not free: a pull is filling it
                if free:
                    freed += tree_bytes(path, allocated=True)
                    shutil.rmtree(path, ignore_errors=True)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + ".lock")
        return freed

    def pull_claims(self, exclude: str | None = None) -> dict[str, int]:
        """namespace -> bytes declared by the pulls in progress (areas whose lock is held)."""
        pulls = self.pulls_dir
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
            with flock_if_free(path + ".lock") as free:
                if not free:
                    out[ns] = out.get(ns, 0) + n
        return out


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

    def __init__(self, layout: ImageLayout, path: str):
        self.path = path
        self.layout = _NotingLayout(layout, path)

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
        sizes = {n: os.path.getsize(os.path.join(images, n)) for n in fmt.criu_dir_entries(images)}
        whole, ranges = fmt.split_for_parts(sizes)
        with ThreadPoolExecutor(workers()) as pool:
            part_digests = [pool.submit(fmt.hash_range, os.path.join(images, name), off, n)
                            for name, off, n in ranges]
            whole_digests = {n: pool.submit(lambda p: of_file(p)[0], os.path.join(images, n)) for n in whole}
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

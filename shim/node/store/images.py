"""The CRIU image directories, the unpacked form of each published snapshot that a restore reads:

  store_dir/images/<hex>/      the image directory of the snapshot with manifest sha256:<hex>,
                               kept once: each file part of the manifest is a byte range of one of
                               its files, the whole-file tar is unpacked beside them
  store_dir/images/<hex>.seal  what the directory held when it was published (per file: size,
                               mtime; whole files also their digest); checked before a restore
  store_dir/images/<hex>.facts what the images would restore (criu_images.Images as JSON), decoded
                               once from the images when they are sealed; its digest is in the seal
                               (a restore then never imports protobuf)
  store_dir/images/<hex>.lock  held shared while a restore reads the directory; its mtime is the
                               snapshot's last use (the node cache evicts least recently used)

A directory that fails its seal is repaired from the verified blobs where it can be."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from thaw.oci import snapshot as fmt
from thaw.oci.digest import of_bytes, of_file
from thaw.oci.files import atomic_write
from thaw.oci.layout import ImageLayout, LayoutError

from ... import faults
from ...drivers import criu_images
from .errors import CorruptSnapshot
from .files import file_bytes, flock, flock_if_free, hex_of, tree_bytes, unlink, workers


class ImageDirs:
    """store_dir/images/: each snapshot's image directory, its seal and its lock.

    `report(level, message)` goes to the node's events; `unpublish(snap, why)` removes a snapshot
    whose file parts are damaged from the index and raises CorruptSnapshot (the store does it:
    the index is not this part's)."""

    def __init__(self, root: str, layout: ImageLayout, report: Callable[[str, str], None],
                 unpublish: Callable[[fmt.Snapshot, str], NoReturn]):
        self.root = root
        self.layout = layout
        self._report = report
        self._unpublish = unpublish

    def path(self, snap: fmt.Snapshot) -> str:
        return os.path.join(self.root, hex_of(snap.manifest.digest))

    def seal_path(self, snap: fmt.Snapshot) -> str:
        return self.path(snap) + ".seal"

    def facts_path(self, snap: fmt.Snapshot) -> str:
        return self.path(snap) + ".facts"

    def sealed(self, snap: fmt.Snapshot) -> bool:
        """Whether the snapshot's image directory is in place and sealed. One without its seal was
        left by a publish killed between the two: not a snapshot's, the next publish replaces it."""
        return os.path.isdir(self.path(snap)) and os.path.exists(self.seal_path(snap))

    def bytes_of(self, snap: fmt.Snapshot) -> int:
        """What the image directory and its seal take (apparent sizes)."""
        path = self.path(snap)
        return tree_bytes(path) + file_bytes(path + ".seal") + file_bytes(path + ".facts")

    # --- a restore's hold -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, snap: fmt.Snapshot, verify: str = "stat") -> Iterator[str]:
        """The snapshot's CRIU image directory, checked against its seal, held (shared lock) until
        the caller is done with it so that no rm or gc removes it mid-restore. A directory that
        fails its seal is checked against the digests: what still matches is sealed again, whole
        files are rebuilt from their verified tar, and a snapshot whose parts are damaged is
        unpublished (so that a capture or pull can replace it) and reported corrupt."""
        path = self.path(snap)
        with flock(path + ".lock", fcntl.LOCK_SH) as fd:
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

    def touch(self, snap: fmt.Snapshot) -> None:
        """Record a use (the node cache's least-recently-used order)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(snap) + ".lock")

    def last_used(self, snap: fmt.Snapshot) -> float | None:
        """When `snap` was last restored (the mtime of its image lock, which touch() sets), else
        when it was published (its seal's mtime); None if neither exists."""
        path = self.path(snap)
        for p in (path + ".lock", path + ".seal"):
            with contextlib.suppress(OSError):
                return os.stat(p).st_mtime
        return None

    # --- facts ----------------------------------------------------------------------------------------
    def facts(self, snap: fmt.Snapshot) -> criu_images.Images:
        """What the snapshot's images would restore, from the facts sealed with them (the caller
        holds the directory); decoded from the images again where there are none, or none that
        this thaw wrote and the seal names (a store entry sealed before facts, or by another
        version: then kept, sealed again, for the next restore). ImageError if the images cannot
        be read."""
        try:
            with open(self.seal_path(snap)) as f:
                sealed = json.load(f).get("facts")
            if sealed is not None:
                with open(self.facts_path(snap), "rb") as f:
                    data = f.read()
                if of_bytes(data) == sealed:
                    return criu_images.from_facts(data)
        except (OSError, ValueError, AttributeError, criu_images.StaleFacts):
            pass
        # Only a store entry sealed before its facts existed decodes here: protobuf's classes stay
        # off every create that finds its facts (measured: ~30 ms with the decoder's import).
        from ...drivers import criu_decode  # noqa: PLC0415
        images = criu_decode.read(self.path(snap))
        with contextlib.suppress(OSError):
            self.write_seal(snap, self.path(snap), images=images)   # the files just passed their seal
        return images

    def _write_facts(self, path: str, images: criu_images.Images | None = None) -> str | None:
        """Keep what the images in `path` (digest-verified when they entered the store) would
        restore beside the seal — `images`, or decoded here; its digest, for the seal. None where
        this node cannot decode images at all: a restore decodes them again once it can."""
        from ...drivers import criu_decode  # noqa: PLC0415 - sealing decodes; a restore reads the facts
        try:
            facts = criu_images.to_facts(images or criu_decode.read(path))
        except criu_images.DecoderMissing:
            return None
        except criu_images.ImageError as exc:
            facts = criu_images.to_facts(None, str(exc))     # a restore reports it (and cold-starts)
        atomic_write(path + ".facts", facts)
        return of_bytes(facts)

    # --- seals --------------------------------------------------------------------------------------
    def _read_seal(self, snap: fmt.Snapshot) -> dict[str, dict[str, Any]]:
        try:
            with open(self.seal_path(snap)) as f:
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


        def check_whole(name: str) -> str | None:
            try:
                ok = of_file(os.path.join(path, name))[0] == (files.get(name) or {}).get("digest")
            except OSError:
                ok = False
            return None if ok else name
        with ThreadPoolExecutor(workers()) as pool:
            results = list(pool.map(check_part, snap.parts))
            results += list(pool.map(check_whole, [n for n in files if n not in parts]))
        return sorted({r for r in results if r})

    def _repair(self, snap: fmt.Snapshot, path: str) -> None:
        """Caller holds the image lock exclusively."""
        if not os.path.isdir(path):
            self._unpublish(snap, "its image directory is gone")
        files = self._read_seal(snap)
        expected = set(files) | {p.file for p in snap.parts}
        for extra in set(os.listdir(path)) - expected:
            os.unlink(os.path.join(path, extra))
        bad = set(self._damaged(snap, path, files)) | (expected - set(os.listdir(path)))
        parts = {p.file for p in snap.parts}
        if bad & parts:
            self._unpublish(snap, f"{', '.join(sorted(bad & parts))} do not match the manifest")
        hashes = None
        if bad:
            for name in bad:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            hashes = self.unpack_whole(snap, path, only=bad)   # the new seal carries their digests
        self.write_seal(snap, path, hashes)
        self._report("warning", f"snapshot {snap.ref} ({snap.namespace}): image directory failed its seal; "
                                f"{'rebuilt ' + ', '.join(sorted(bad)) if bad else 'content intact, sealed again'}")

    def unpack_whole(self, snap: fmt.Snapshot, path: str, only: set[str] | None = None) -> dict[str, str]:
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
                    if name in hashes:     # files unpacked and hashed whole: moved, not written (no atomic_write)
                        os.rename(os.path.join(tmp, name), os.path.join(path, name))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return hashes

    def write_seal(self, snap: fmt.Snapshot, path: str, hashes: dict[str, str] | None = None,
                   images: criu_images.Images | None = None) -> None:
        old = {}
        with contextlib.suppress(CorruptSnapshot):
            old = self._read_seal(snap)
        files = {}
        for name in sorted(os.listdir(path)):
            st = os.lstat(os.path.join(path, name))
            digest = (hashes or {}).get(name) or (old.get(name) or {}).get("digest")
            files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest}
        facts = self._write_facts(path, images)
        atomic_write(self.seal_path(snap), json.dumps({"manifest": snap.manifest.digest, "files": files,
                                                       "facts": facts}).encode())

    # --- in and out (the caller holds the store lock) -----------------------------------------------
    def place(self, snap: fmt.Snapshot, staged_images: str, hashes: dict[str, str] | None) -> None:
        """Move a staged image directory into place (read-only) and seal it."""
        target = self.path(snap)
        for name in os.listdir(staged_images):
            os.chmod(os.path.join(staged_images, name), 0o400)
        os.chmod(staged_images, 0o700)
        os.rename(staged_images, target)      # a whole directory appears at once: no file write
        faults.point("image_dir_moved")     # the tests kill a publish here
        self.write_seal(snap, target, hashes)

    def remove(self, path: str) -> int:
        """Remove an image directory, its seal and lock unless a restore holds it; bytes freed."""
        with flock_if_free(path + ".lock") as free:
            # not free: a restore reads it, a later gc removes it
            return self.remove_held(path) if free else 0

    @staticmethod
    def remove_held(path: str) -> int:
        """The caller holds path.lock exclusively."""
        freed = tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        return freed + sum(unlink(path + suffix) for suffix in (".seal", ".facts", ".lock"))

    def sweep(self, live: set[str]) -> int:
        """Remove the image directories (and seals, locks) of manifests not in `live` (hex
        digests) that no restore holds; bytes freed."""
        freed = 0
        for name in os.listdir(self.root):
            hexd = name.split(".", 1)[0]
            if hexd in live:
                continue
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                freed += self.remove(path)
            elif not os.path.exists(os.path.join(self.root, hexd)):
                freed += unlink(path)    # seals, facts and locks of directories already gone
        return freed

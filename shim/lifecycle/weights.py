"""Weights outside the snapshot: the files an engine reloads at its wake, named, recorded at capture
(path, size, digest, origin), and at restore found in the new container, verified and read into
the page cache while CRIU restores.

Every file is opened with openat2 RESOLVE_IN_ROOT, rooted where the container's own view starts
(its root at capture; the bundle's root file system or the volume's source at restore), so a
symlink the container planted resolves inside that root, never on the host. Digests are cached per
file identity (dev, inode, size, mtime, ctime: ctime cannot be set back by anyone), so a restore
hashes only a file it has never seen; the cache lives in thaw's root-only state directory.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from thaw.oci import ThawError
from thaw.oci import snapshot as fmt
from thaw.oci.digest import of_fd
from thaw.oci.files import atomic_write, make_private_dir
from thaw.oci.spec import Bundle

from ..drivers import pagecache
from ..drivers.cuda import device_memory, process_tree
from ..drivers.engine import open_in_root
from ..drivers.rootfs import overlay_dirs
from ..timing import Stopwatch
from .fingerprint import layer_digest

SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")   # what a named directory's weights are
CHUNK = 8 << 20
READERS = 8                      # parallel readers of one restore's files (page cache fill)
BIND_TYPES = ("bind", "rbind")
# The engine released its weights if the memory it held fell by at least this share of their size.
RELEASED_SHARE = 0.9


class WeightsError(ThawError):
    pass


# --- the digest cache ------------------------------------------------------------------------------

def identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class DigestCache:
    """file identity -> sha256 digest, in `state_dir`/weights/digests.json. Entries of files that
    changed simply stop matching; the file keeps the newest 4096."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(make_private_dir(os.path.join(state_dir, "weights")), "digests.json")
        self._lock = threading.Lock()
        try:
            with open(self.path) as f:
                raw = json.load(f)
            self.entries: dict[str, str] = {k: v for k, v in raw.items() if isinstance(v, str)} \
                if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            self.entries = {}
        self._dirty = False

    def get(self, st: os.stat_result) -> str | None:
        return self.entries.get(identity(st))

    def put(self, st: os.stat_result, digest: str) -> None:
        with self._lock:
            self.entries[identity(st)] = digest
            self._dirty = True

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            keep = dict(list(self.entries.items())[-4096:])
            try:
                atomic_write(self.path, json.dumps(keep).encode(), durable=False)
            except OSError:
                pass               # a lost cache costs a hash next time, nothing else
            self._dirty = False


def digest_of(fd: int, st: os.stat_result, cache: DigestCache) -> str:
    digest = cache.get(st)
    if digest is None:
        digest = of_fd(fd, bytearray(CHUNK))
        cache.put(st, digest)
    return digest


# --- where a path inside the container lives --------------------------------------------------------

def _mount_for(spec: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The spec's mount whose destination holds `path` (the deepest; the later of equals)."""
    best, depth = None, -1
    for m in spec.get("mounts") or []:
        dest = os.path.normpath(m.get("destination") or "/")
        if (path == dest or path.startswith(dest.rstrip("/") + "/")) and len(dest) >= depth:
            best, depth = m, len(dest)
    return best


def _is_bind(m: dict[str, Any]) -> bool:
    return m.get("type") in BIND_TYPES or any(o in BIND_TYPES for o in m.get("options") or [])


def _open_regular(root_fd: int, path: str) -> tuple[int, os.stat_result]:
    fd = open_in_root(root_fd, path, os.O_RDONLY)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise WeightsError(f"weight file {path} is not a regular file")
    return fd, st


def _expand(root_fd: int, path: str) -> list[str]:
    """A named path -> the files it stands for: itself, or a directory's weight files."""
    try:
        fd = open_in_root(root_fd, path, os.O_RDONLY)
    except OSError as exc:
        raise WeightsError(f"weights {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return [path]
        # Entries as they are (a symlink is not followed here; openat2 resolves it inside the root).
        names = sorted(e.name for e in os.scandir(fd) if e.name.endswith(SUFFIXES)
                       and (e.is_file(follow_symlinks=False) or e.is_symlink()))
    finally:
        os.close(fd)
    if not names:
        raise WeightsError(f"weights {path}: a directory without weight files ({', '.join(SUFFIXES)})")
    return [os.path.join(path, n) for n in names]


def manifest(root_fd: int, bundle: Bundle, paths: tuple[str, ...], cache: DigestCache,
             layer_cache: str | None = None) -> tuple[fmt.WeightFile, ...]:
    """Record the weight files `paths` name in a running container (root_fd: its root): each
    file's path, size, digest and origin (image layer, volume, or root file system). The origin
    goes by the path as named (the mount it lies under): a restore resolves that path again inside
    the same kind of root, so a symlink that leaves its volume or image finds nothing there (name
    the real path)."""
    try:
        upper, lowers = overlay_dirs(bundle.rootfs)
    except OSError:
        upper, lowers = None, []
    out: list[fmt.WeightFile] = []
    seen: set[tuple[int, int]] = set()
    for named in paths:
        for path in _expand(root_fd, named):
            real = os.path.normpath(path)
            try:
                fd, st = _open_regular(root_fd, real)
            except OSError as exc:
                raise WeightsError(f"weight file {path}: {exc.strerror}") from exc
            try:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                digest = digest_of(fd, st, cache)
            finally:
                os.close(fd)
            m = _mount_for(bundle.spec, real)
            if m is not None and os.path.normpath(m.get("destination") or "/") != "/":
                if not _is_bind(m):
                    raise WeightsError(f"weight file {real} is on a {m.get('type')} mount "
                                       f"({m.get('destination')}): only the image or a volume holds weights")
                dest = os.path.normpath(m["destination"])
                out.append(fmt.WeightFile(real, st.st_size, digest, "volume", mount=dest,
                                          source=os.path.normpath(m.get("source") or "")))
                continue
            layer = None
            for lower in lowers:
                if os.path.isabs(lower) and _exists_in(lower, real):
                    layer = layer_digest(os.path.realpath(lower), layer_cache)
                    break
            origin = "image" if layer else "rootfs"
            if upper and layer is None and lowers:
                origin = "rootfs"         # written by the container: its rootfs diff carries it
            out.append(fmt.WeightFile(real, st.st_size, digest, origin, layer=layer))
    return tuple(out)


def _exists_in(root: str, path: str) -> bool:
    try:
        rfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.close(open_in_root(rfd, path))
        return True
    except OSError:
        return False
    finally:
        os.close(rfd)


def open_for_restore(bundle: Bundle, wf: fmt.WeightFile) -> tuple[int, os.stat_result]:
    """Open a recorded weight file where the new container will see it: under the new spec's
    bind mount that holds its path (resolved inside the mount's source), else in the bundle's root
    file system (resolved inside it)."""
    m = _mount_for(bundle.spec, wf.path)
    if m is not None and os.path.normpath(m.get("destination") or "/") != "/" and _is_bind(m):
        dest, source = os.path.normpath(m["destination"]), m.get("source") or ""
        rel = os.path.relpath(wf.path, dest)
        root = source if rel != "." else os.path.dirname(source)
        rel = rel if rel != "." else os.path.basename(source)
    elif m is not None and os.path.normpath(m.get("destination") or "/") != "/":
        raise WeightsError(f"weight file {wf.path} is on a {m.get('type')} mount in this container")
    else:
        root, rel = bundle.rootfs, wf.path
    try:
        rfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WeightsError(f"weight file {wf.path}: its root {root}: {exc.strerror}") from exc
    try:
        return _open_regular(rfd, rel)
    except OSError as exc:
        raise WeightsError(f"weight file {wf.path}: {exc.strerror} (resolved inside {root})") from exc
    finally:
        os.close(rfd)


# --- restore: open, verify, read into the page cache, concurrently ------------------------------------

class Prefetch:
    """The weight files of a restore, opened and checked (size; digest where the cache knows the
    file) at once; a file the cache does not know is hashed in parallel from then on, while CRIU
    restores. The files it knows are read into the page cache only from start_reads(), once
    CRIU is done: on a cold node the snapshot's pages get the disk first, and the weights' reads
    overlap the CUDA restore and the engine's own reload instead of delaying CRIU. verified()
    joins the hashing and raises WeightsError on any mismatch; wait() joins everything."""

    def __init__(self, bundle: Bundle, weights: fmt.Weights, cache: DigestCache):
        self.cache, self.files, self.bytes = cache, [], 0
        self.hashed = 0
        self._clock = Stopwatch()
        self._stop = threading.Event()
        try:
            for wf in weights.files:
                fd, st = open_for_restore(bundle, wf)
                self.files.append((wf, fd, st))
                if st.st_size != wf.size:
                    raise WeightsError(f"weight file {wf.path} changed: {st.st_size} bytes, the snapshot "
                                       f"recorded {wf.size}")
                known = cache.get(st)
                if known is not None and known != wf.digest:
                    raise WeightsError(f"weight file {wf.path} changed: digest {known}, the snapshot "
                                       f"recorded {wf.digest}")
                self.bytes += st.st_size
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="weights")
        self._hashing: list[Future[None]] = []
        self._reading: list[Future[int]] = []
        self._unread: list[int] = []        # descriptors of the known files, for start_reads()
        for wf, fd, st in self.files:
            if cache.get(st) is None:
                _will_need(fd)
                self._hashing.append(self._pool.submit(self._verify, wf, fd, st))
            else:
                self._unread.append(fd)

    def start_reads(self) -> None:
        """Read the files the digest cache knows into the page cache, in READERS parallel pieces."""
        for fd in self._unread:
            _will_need(fd)
            size = os.fstat(fd).st_size
            step = max(CHUNK, -(-size // READERS))
            for off in range(0, size, step):
                self._reading.append(self._pool.submit(self._read, fd, off, min(step, size - off)))
        self._unread = []

    def _verify(self, wf: fmt.WeightFile, fd: int, st: os.stat_result) -> None:
        digest = of_fd(fd, bytearray(CHUNK))
        self.hashed += st.st_size
        if digest != wf.digest:
            raise WeightsError(f"weight file {wf.path} changed: digest {digest}, the snapshot recorded {wf.digest}")
        self.cache.put(st, digest)

    def _read(self, fd: int, off: int, length: int) -> int:
        """Pull [off, off + length) into the page cache, skipping what is there (on a warm node the
        copies would take the memory bandwidth of the restore's own work). Returns the bytes read."""
        return pagecache.fill(fd, off, length, bytearray(min(CHUNK, length)), lambda: not self._stop.is_set())[0]

    def verified(self) -> None:
        """Join the hashing; WeightsError if a file did not match (the reads go on: abort() ends them)."""
        for f in self._hashing:
            f.result()
        self.cache.save()

    def wait(self) -> dict[str, Any]:
        """Start the reads if they were not, join everything; WeightsError if a file did not
        match. Returns what was done."""
        self.start_reads()
        try:
            self.verified()
            read = sum(f.result() for f in self._reading)
        finally:
            self._pool.shutdown(wait=True)
            self.close()
        return {"files": len(self.files), "bytes": self.bytes, "hashed": self.hashed, "read": read,
                "seconds": round(self._clock.seconds(), 4)}

    def abort(self) -> None:
        """End it (the restore is done, or failed elsewhere): no new reads, the running ones stop
        after their current piece; fds closed."""
        self._stop.set()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.close()

    def close(self) -> None:
        for _, fd, _ in self.files:
            try:
                os.close(fd)
            except OSError:
                pass
        self.files = []


def _will_need(fd: int) -> None:
    """The kernel starts reading the file ahead now (a hint: it reads a readahead window, not
    necessarily the whole file; an error changes nothing)."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def warm_sources(weights: fmt.Weights, cache: DigestCache, keep_going: Callable[[], bool]) -> int:
    """Before any container exists (a pod sandbox's create): read the weight files whose host
    location is known — a volume's recorded source — into the page cache, hashing them into the
    cache so that the restore need not (a file the cache knows: only what the page cache lacks,
    so that on a cold node the disk goes on from the snapshot's pages to the weights). A source
    that is missing, not a directory, holds no regular file at the path (resolved inside it) or
    one of another size is skipped. Returns the bytes read."""
    done = 0
    buf = bytearray(CHUNK)
    for wf in weights.files:
        if wf.origin != "volume" or not wf.source or not wf.mount or not keep_going():
            continue
        try:        # resolved inside the volume's source, as the restore will (a volume's symlink stays in it)
            rfd = os.open(wf.source, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fd, st = _open_regular(rfd, os.path.relpath(wf.path, wf.mount))
            finally:
                os.close(rfd)
        except (OSError, WeightsError):
            continue
        try:
            if st.st_size != wf.size:
                continue
            if cache.get(st) is not None:        # known: only what the page cache lacks
                done += pagecache.fill(fd, 0, st.st_size, buf, keep_going)[0]
                continue
            if of_fd(fd, buf) == wf.digest:
                cache.put(st, wf.digest)
            done += st.st_size
        finally:
            os.close(fd)
    cache.save()
    return done


# --- capture: how much the engine released ---------------------------------------------------------

def held_memory(pid: int, gpu: bool) -> tuple[int, str]:
    """What the container's processes hold: device memory of its CUDA processes (gpu), else their
    resident host memory."""
    pids = process_tree(pid)
    if gpu:
        return device_memory(pids), "gpu"
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total, "rss"


def judge(files: tuple[fmt.WeightFile, ...], before: int, after: int, measure: str) -> fmt.Weights:
    """The manifest with the capture's verdict: outside if the engine released (nearly) all of it."""
    total = sum(f.size for f in files)
    return fmt.Weights(files, total > 0 and before - after >= RELEASED_SHARE * total, before, after, measure)

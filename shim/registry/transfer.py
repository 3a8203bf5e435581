"""Push and pull a set of blobs in parallel: a bounded thread pool over one RegistryClient, one
progress interface, cancellation of everything on the first hard error, and (for pulls) a
journal of resume points so that a pull killed mid-blob and run again reuses what it wrote.

The journal is a small file the caller places next to the partial data (somewhere its garbage
collection leaves alone while a pull may resume): one JSON line per resume point,
["KEY", bytes, "sha256:prefix"] with KEY = "DIGEST PATH OFFSET", appended (never rewritten: a
pull of n blobs writes O(n) bytes, not O(n^2)); the last line of a key wins, and a torn last
line is ignored. A line is only written after the bytes it names were written, so it never
claims more than is there. A finished blob keeps an entry with bytes == size: a rerun re-hashes
it instead of fetching it again.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ..timing import Stopwatch
from .blobs import BlobRange
from .client import RegistryClient
from .errors import Cancelled, DigestMismatchError, LocalFileError, RegistryError

DEFAULT_PARALLEL = 4
PROGRESS_INTERVAL_S = 0.1  # byte-level events at most this often; blob and end events always


@dataclass
class BlobProgress:
    digest: str
    total: int
    done: int = 0
    outcome: str | None = None  # set when finished: present, mounted, uploaded, downloaded, verified
    reused: int = 0  # bytes of a pull that were already on disk


@dataclass
class Progress:
    """Where a transfer stands; passed to the listener on every event (read it, don't keep it
    across threads). Events: "start", "bytes" (throttled), "blob" (one finished), "end"."""
    operation: str  # push or pull
    blobs: dict[str, BlobProgress] = field(default_factory=dict)
    clock: Stopwatch = field(default_factory=Stopwatch)
    error: RegistryError | None = None

    _total: int | None = None

    @property
    def total(self) -> int:
        if self._total is None:    # the blobs are fixed once a transfer starts: summed once
            self._total = sum(b.total for b in self.blobs.values())
        return self._total

    @property
    def done(self) -> int:
        return sum(b.done for b in self.blobs.values())

    @property
    def finished(self) -> int:
        return sum(1 for b in self.blobs.values() if b.outcome)

    def elapsed(self) -> float:
        return self.clock.seconds()

    def rate(self) -> float:
        """Bytes per second moved over the network (reused and skipped bytes excluded)."""
        moved = sum(b.done - b.reused for b in self.blobs.values() if b.outcome not in ("present", "mounted"))
        t = self.elapsed()
        return moved / t if t > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        left = self.total - self.done
        return left / rate if rate > 0 else None


Listener = Callable[[str, Progress, BlobProgress | None], None]


class _Tracker:
    """Serialises progress updates from the worker threads and throttles byte events."""

    def __init__(self, progress: Progress, listener: Listener | None):
        self.progress, self.listener = progress, listener
        self._lock = threading.Lock()
        self._last = 0.0

    def emit(self, event: str, blob: BlobProgress | None = None) -> None:
        if self.listener:
            with self._lock:
                self.listener(event, self.progress, blob)

    def on_bytes(self, digest: str) -> Callable[[int], None]:
        bp = self.progress.blobs[digest]

        def update(done: int) -> None:
            bp.done = done
            now = time.monotonic()
            if self.listener and now - self._last >= PROGRESS_INTERVAL_S:
                with self._lock:
                    if now - self._last >= PROGRESS_INTERVAL_S:
                        self._last = now
                        self.listener("bytes", self.progress, bp)
        return update

    def finish(self, digest: str, outcome: str) -> None:
        bp = self.progress.blobs[digest]
        bp.done, bp.outcome = bp.total, outcome
        self.emit("blob", bp)


class Journal:
    """Resume points of a pull, appended to one file (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._entries: dict[str, tuple[int, str]] = {}
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        if not isinstance(entry, list) or len(entry) != 3:
                            raise ValueError("not a journal line")
                        key, done, prefix = entry
                    except (ValueError, TypeError):
                        break                       # a torn last line: what follows is not trusted
                    if prefix is None:
                        self._entries.pop(str(key), None)
                    else:
                        self._entries[str(key)] = (int(done), str(prefix))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LocalFileError(f"cannot read the pull journal {path}: {exc}") from exc

    @staticmethod
    def key(blob: BlobRange) -> str:
        return f"{blob.digest} {blob.path} {blob.offset}"

    def get(self, blob: BlobRange) -> tuple[int, str | None]:
        with self._lock:
            done, prefix = self._entries.get(self.key(blob), (0, None))
        return done, prefix

    def record(self, blob: BlobRange, done: int, prefix: str) -> None:
        with self._lock:
            self._entries[self.key(blob)] = (done, prefix)
            self._append([self.key(blob), done, prefix])

    def forget(self, blob: BlobRange) -> None:
        with self._lock:
            if self._entries.pop(self.key(blob), None) is not None:
                self._append([self.key(blob), 0, None])

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def remove(self) -> None:
        self.close()
        with self._lock:
            self._entries = {}
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _append(self, entry: list[Any]) -> None:
        line = (json.dumps(entry) + "\n").encode()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.write(self._fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            raise LocalFileError(f"cannot write the pull journal {self.path}: {exc}") from exc


def push_blobs(client: RegistryClient, repo: str, blobs: Sequence[BlobRange], *, parallel: int = DEFAULT_PARALLEL,
               mount_from: tuple[str, ...] = (), chunk_size: int | None = None, listener: Listener | None = None,
               cancel: threading.Event | None = None) -> Progress:
    """Makes `repo` hold every blob: HEAD skips those present, `mount_from` repositories are
    tried for a cross-repository mount, the rest are uploaded from their ranges. Returns the
    final Progress (each blob's outcome). Raises the first error; the others are cancelled."""
    unique = list({b.digest: b for b in blobs}.values())  # one upload per digest

    def one(blob: BlobRange, tracker: _Tracker, stop: _Stop) -> None:
        outcome = client.push_blob(repo, blob, mount_from=mount_from, chunk_size=chunk_size,
                                   on_bytes=tracker.on_bytes(blob.digest), cancel=stop)
        tracker.finish(blob.digest, outcome)

    return _run("push", unique, one, parallel, listener, cancel)


def pull_blobs(client: RegistryClient, repo: str, blobs: Sequence[BlobRange], *, parallel: int = DEFAULT_PARALLEL,
               journal: str | None = None, listener: Listener | None = None,
               cancel: threading.Event | None = None) -> Progress:
    """Fills every blob's range with the blob, verified, resuming from the journal's points.
    Returns when all are verified (each blob's outcome "downloaded", or "verified" when the
    range already held it); raises the first error, cancelling the rest. On error no blob that
    failed verification keeps a journal entry. The journal stays (for a later resume) until the
    caller calls Journal(path).remove() after publishing."""
    jr = Journal(journal) if journal else None
    keys: dict[str, BlobRange] = {}
    for b in blobs:  # one entry per (digest, path, offset)
        keys.setdefault(Journal.key(b), b)
    items = list(keys.values())

    def one(blob: BlobRange, tracker: _Tracker, stop: _Stop) -> None:
        have, prefix = jr.get(blob) if jr else (0, None)
        record = (lambda n, d: jr.record(blob, n, d)) if jr else None
        bp, update = tracker.progress.blobs[_tkey(blob)], tracker.on_bytes(_tkey(blob))
        started: list[int] = []

        def on_bytes(n: int) -> None:
            if not started:  # the first report is the prefix reused: not moved, so not in the rate
                started.append(n)
                bp.reused = n
            update(n)
        try:
            reused = client.download_blob(repo, blob, have=have, have_digest=prefix, on_bytes=on_bytes,
                                          checkpoint=record, cancel=stop)
        except DigestMismatchError:
            if jr:
                jr.forget(blob)  # those bytes are wrong: nothing of them may be resumed
            raise
        if jr:
            jr.record(blob, blob.size, blob.digest)
        bp.reused = reused
        tracker.finish(_tkey(blob), "verified" if reused == blob.size else "downloaded")

    try:
        return _run("pull", items, one, parallel, listener, cancel)
    finally:
        if jr:
            jr.close()


def _tkey(blob: BlobRange) -> str:
    return Journal.key(blob)


def _run(operation: str, items: list[BlobRange], one: Callable[[BlobRange, _Tracker, _Stop], None],
         parallel: int, listener: Listener | None,
         cancel: threading.Event | None) -> Progress:
    progress = Progress(operation)
    for b in items:
        key = b.digest if operation == "push" else _tkey(b)
        progress.blobs[key] = BlobProgress(b.digest, b.size)
    tracker = _Tracker(progress, listener)
    stop = _Stop(cancel)
    tracker.emit("start")
    # Largest first: the long transfers start early and the pool stays busy to the end.
    order = sorted(items, key=lambda b: -b.size)
    first: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix=f"registry-{operation}") as pool:
        futures = [pool.submit(one, b, tracker, stop) for b in order]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            stop.set()  # the others stop at their next chunk
        wait(futures)
    errors = [f.exception() for f in futures if f.exception() is not None]
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if errors:
        first = real[0] if real else errors[0]
    if first is not None:
        progress.error = first if isinstance(first, RegistryError) else None
        tracker.emit("end")
        raise first
    tracker.emit("end")
    return progress


class _Stop:
    """Set on the first error; also set whenever the caller's cancel event is. Offers the
    `is_set()` that the client's loops check between chunks."""

    def __init__(self, cancel: threading.Event | None):
        self._own = threading.Event()
        self._cancel = cancel

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._cancel is not None and self._cancel.is_set())

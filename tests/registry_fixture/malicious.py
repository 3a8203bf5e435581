"""A hostile registry for the limits tests: plain HTTP on 127.0.0.1 only, serving thaw snapshots a
test builds (real manifests, configs and blobs, so that a pull goes as far as the attack lets it)
and misbehaving as the test tells it: a blob declared large and served a few bytes then held,
bytes trickled, error bodies with terminal escapes and echoed credentials, manifests of
thousands of blobs, malformed layers. Every request is recorded."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from registry_fixture.httpd import LoopbackServer
from thaw.oci import snapshot as fmt
from thaw.oci.layout import Descriptor

BlobBehaviour = Callable[[BaseHTTPRequestHandler, bytes], None]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MaliciousRegistry(LoopbackServer):
    def __init__(self):
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.blob_behaviour: dict[str, BlobBehaviour] = {}   # digest -> how to answer its GET
        self.answer_all: Callable[[BaseHTTPRequestHandler], bool] | None = None   # True: answered
        self.requests: list[tuple[str, str, dict]] = []
        self.release = threading.Event()           # what a held blob waits for
        self.held = threading.Event()              # set once a held blob sent its first bytes
        self._lock = threading.Lock()
        super().__init__(self._handler())

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_requests(self) -> list[str]:
        with self._lock:
            return [path for method, path, _h in self.requests if "/blobs/" in path]

    # --- building snapshots ---------------------------------------------------------------------
    def put_snapshot(self, repo: str, tag: str, namespace: str = "team-a",
                     parts: list[bytes] | None = None, declared: dict[int, int] | None = None,
                     whole: bytes | None = None, parts_per_file: int = 1) -> fmt.Snapshot:
        """Serve a thaw snapshot at REPO:TAG whose pages are `parts` (each a file part;
        `parts_per_file` consecutive parts make one file). `declared`: part index -> the size
        its descriptor claims instead of its real size. `whole`: the CRIU whole-file layer's
        bytes (default: a valid tar of one small file). Returns the snapshot the manifest names."""
        parts = parts if parts is not None else [os.urandom(4096)]
        declared = declared or {}
        whole = whole if whole is not None else _tar({"inventory.img": b"inv", "descriptors.json": b"[]"})
        rootfs = _tar({})
        deleted = fmt.deleted_blob([])
        descs = []
        file_parts = []
        offsets: dict[str, int] = {}
        for i, data in enumerate(parts):
            name = f"pages-{i // parts_per_file + 1}.img"
            size = declared.get(i, len(data))
            desc = Descriptor(fmt.CRIU_PART_LAYER, sha256(data), size)
            file_parts.append(fmt.FilePart(name, offsets.get(name, 0), desc))
            offsets[name] = offsets.get(name, 0) + size
            self.blobs[desc.digest] = data
            descs.append(desc)
        whole_d = Descriptor(fmt.CRIU_WHOLE_LAYER, sha256(whole), len(whole))
        rootfs_d = Descriptor(fmt.ROOTFS_LAYER, sha256(rootfs), len(rootfs))
        deleted_d = Descriptor(fmt.DELETED_LAYER, sha256(deleted), len(deleted))
        for d, data in ((whole_d, whole), (rootfs_d, rootfs), (deleted_d, deleted)):
            self.blobs[d.digest] = data
        config = fmt.SnapshotConfig(ref=f"{repo}:{tag}", fingerprint=fmt.Fingerprint(), namespace=namespace,
                                    phases={"total": 1.0})
        config_bytes = config.blob()
        config_d = Descriptor(fmt.CONFIG_MEDIA_TYPE, sha256(config_bytes), len(config_bytes))
        self.blobs[config_d.digest] = config_bytes
        manifest = fmt.manifest_blob(config, config_d, whole_d, file_parts, rootfs_d, deleted_d)
        self.manifests[(repo, tag)] = manifest
        mdesc = Descriptor(fmt.MANIFEST_MEDIA_TYPE, sha256(manifest), len(manifest))
        return fmt.Snapshot(f"{self.host}/{repo}:{tag}", namespace, mdesc, config_d, config, whole_d,
                            tuple(file_parts), rootfs_d, deleted_d)

    def hold_after(self, digest: str, first: int, length: int | None = None) -> None:
        """The blob's GET announces `length` bytes (default: its declared size, the blob's real
        size if unknown), sends `first` of them, then waits for `release` and drops the connection."""
        def answer(h: BaseHTTPRequestHandler, data: bytes) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(length if length is not None else len(data)))
            h.end_headers()
            h.wfile.write(data[:first])
            h.wfile.flush()
            self.held.set()
            self.release.wait(120)
            h.close_connection = True
        self.blob_behaviour[digest] = answer

    def trickle(self, digest: str, every_s: float = 0.2) -> None:
        """The blob's bytes, one every `every_s` seconds (never a read timeout, never done)."""
        def answer(h: BaseHTTPRequestHandler, data: bytes) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            self.held.set()
            for i in range(len(data)):
                if self.release.is_set():
                    break
                h.wfile.write(data[i:i + 1])
                h.wfile.flush()
                time.sleep(every_s)
            h.close_connection = True
        self.blob_behaviour[digest] = answer

    # --- serving -------------------------------------------------------------------------------
    def _handler(self):
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True      # headers and body are separate writes: no 40 ms stalls

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.do_GET(body=False)

            def do_GET(self, body: bool = True):
                with registry._lock:
                    registry.requests.append((self.command, self.path, dict(self.headers)))
                try:
                    if registry.answer_all is not None and registry.answer_all(self):
                        return
                    self._serve(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _serve(self, body: bool) -> None:
                if self.path.rstrip("/") == "/v2":
                    return self.send(200, b"{}")
                m = re.match(r"^/v2/(.+)/(manifests|blobs)/([^/?]+)$", self.path)
                if not m:
                    return self.send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
                repo, kind, ref = m.groups()
                if kind == "manifests":
                    data = registry.manifests.get((repo, ref))
                    if data is None:
                        return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                    return self.send(200, data, fmt.MANIFEST_MEDIA_TYPE, {"Docker-Content-Digest": sha256(data)},
                                     body)
                data = registry.blobs.get(ref)
                if data is None:
                    return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
                behaviour = registry.blob_behaviour.get(ref)
                if behaviour is not None and body:
                    return behaviour(self, data)
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    return self.send(206, data[start:], headers={
                        "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, body=body)
                return self.send(200, data, body=body)

            def send(self, status: int, data: bytes, ctype: str = "application/octet-stream",
                     headers: dict | None = None, body: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)
        return Handler


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def basic_auth_file(directory: str, host: str, user: str, password: str) -> str:
    path = os.path.join(directory, f"auth-{host.replace(':', '_')}.json")
    with open(path, "w") as f:
        json.dump({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}, f)
    return path


__all__ = ["MaliciousRegistry", "basic_auth_file", "sha256"]

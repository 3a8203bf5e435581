"""A small HTTP proxy on 127.0.0.1 in front of a test registry, for faults a real registry will
not produce by itself:

  corrupt_at=N     blob GET bodies get byte N of the blob flipped (Range responses included)
  redirect=True    authenticated blob GETs are answered with a 307 to this proxy's "storage" side under another
                   origin (http://localhost:PORT/storage/...), as registries do for blob storage;
                   the storage side records the Authorization headers it was sent
Everything else is passed through unchanged (Location headers rewritten to the proxy). Plain HTTP
towards the client (list it as insecure), the registry's scheme (and CA) towards the registry.
"""

from __future__ import annotations

import http.client
import re
import ssl
import urllib.parse
from http.server import BaseHTTPRequestHandler

from .httpd import LoopbackServer

_BLOB_GET = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-authenticate", "host"}


class RegistryProxy(LoopbackServer):
    def __init__(self, upstream_url: str, *, ca: str | None = None, corrupt_at: int | None = None,
                 redirect: bool = False, upstream_auth: str | None = None):
        self.upstream = urllib.parse.urlsplit(upstream_url)
        self.ctx = ssl.create_default_context(cafile=ca) if self.upstream.scheme == "https" else None
        self.corrupt_at, self.redirect, self.upstream_auth = corrupt_at, redirect, upstream_auth
        self.storage_auth_headers: list[str | None] = []  # Authorization seen by the storage side
        self.redirected_auth_headers: list[str] = []  # Authorization of the blob GETs redirected
        self.blob_gets = 0
        super().__init__(self._handler())

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage_host(self) -> str:
        return f"localhost:{self.port}"

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self.upstream.hostname, self.upstream.port
        assert host is not None, self.upstream  # an upstream URL names its host
        if self.ctx:
            return http.client.HTTPSConnection(host, port, context=self.ctx, timeout=30)
        return http.client.HTTPConnection(host, port, timeout=30)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._forward()

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def _forward(self):
                path = self.path
                storage = path.startswith("/storage/")
                if storage:
                    proxy.storage_auth_headers.append(self.headers.get("Authorization"))
                    path = path[len("/storage"):]
                elif proxy.redirect and self.command == "GET" and _BLOB_GET.match(path) \
                        and self.headers.get("Authorization"):
                    # Authenticated at the registry (an anonymous GET is passed on and gets its 401).
                    proxy.redirected_auth_headers.append(self.headers["Authorization"])
                    self.send_response(307)
                    self.send_header("Location", f"http://{proxy.storage_host}/storage{path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if storage:
                    headers.pop("Authorization", None)
                    if proxy.upstream_auth:
                        headers["Authorization"] = proxy.upstream_auth
                headers["Host"] = self.upstream_netloc()
                conn = proxy._connect()
                try:
                    conn.request(self.command, path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() in _HOP:
                            continue
                        if k.lower() == "location":
                            v = v.replace(f"{proxy.upstream.scheme}://{self.upstream_netloc()}", f"http://{proxy.host}")
                        self.send_header(k, v)
                    if resp.getheader("Content-Length") is None and self.command != "HEAD":
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    blob = self.command == "GET" and _BLOB_GET.match(path) and resp.status in (200, 206)
                    if blob:
                        proxy.blob_gets += 1
                    pos = _range_start(resp.getheader("Content-Range")) if blob else 0
                    while True:
                        chunk = resp.read(1 << 16)
                        if not chunk:
                            break
                        if blob and proxy.corrupt_at is not None and pos <= proxy.corrupt_at < pos + len(chunk):
                            i = proxy.corrupt_at - pos
                            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                        pos += len(chunk)
                        self.wfile.write(chunk)
                except OSError:
                    self.close_connection = True
                finally:
                    conn.close()

            def upstream_netloc(self) -> str:
                return proxy.upstream.netloc

        return Handler


def _range_start(value: str | None) -> int:
    if not value:
        return 0
    return int(value.split()[1].split("-")[0])

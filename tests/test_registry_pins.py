"""What the registry client sends and trusts, against a scripted HTTP server on loopback playing a
registry that misbehaves or attacks (redirects to another port, a token realm over plain HTTP, a
Range request answered 200, damaged bytes already on disk). docker-registry does none of these by
itself; test_registry.py covers the real registry."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading

import pytest

from thaw.shim.registry.blobs import BlobRange
from thaw.shim.registry.client import RegistryClient
from thaw.shim.registry.errors import DigestMismatchError, RegistryConfigError
from thaw.shim.registry.transport import Settings

BLOB = os.urandom(200_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class Server:
    """A loopback HTTP server whose answers a test scripts: handler(request) -> (status, headers,
    body); every request's method, path and headers are kept."""

    def __init__(self, handler):
        self.seen: list[tuple[str, str, dict]] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                outer.seen.append((self.command, self.path, dict(self.headers)))
                status, headers, body = handler(self)
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _any

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(handler) -> Server:
        made.append(Server(handler))
        return made[-1]
    yield make
    for s in made:
        s.close()


def auth_file(tmp_path, host: str) -> str:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(b"alice:secret").decode()}}}))
    return str(path)


def blob_answer(req, data: bytes = BLOB, honour_range: bool = True):
    rng = req.headers.get("Range")
    if rng and honour_range:
        start = int(rng.split("=")[1].rstrip("-"))
        return 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, data[start:]
    return 200, {}, data


def test_credentials_never_follow_a_redirect_to_another_port_of_the_same_host(servers, tmp_path):
    storage = servers(lambda req: blob_answer(req))

    def registry(req):
        if not req.headers.get("Authorization"):
            return 401, {"WWW-Authenticate": 'Basic realm="r"'}, b""
        return 307, {"Location": f"http://{storage.host}/blob"}, b""
    reg = servers(registry)
    settings = Settings(auth_config=auth_file(tmp_path, reg.host), insecure_hosts=(reg.host, storage.host))
    with RegistryClient(reg.host, settings) as c:
        c.download_blob("team/app", BlobRange(DIGEST, str(tmp_path / "out"), 0, len(BLOB)))
    assert open(tmp_path / "out", "rb").read() == BLOB
    assert any(h.get("Authorization", "").startswith("Basic ") for _, _, h in reg.seen)
    assert storage.seen and not [h for _, _, h in storage.seen if "Authorization" in h]


def token_registry(servers, realm_host_of):
    """A registry asking for bearer tokens from a realm on another server; tokens name their scope."""
    def token(req):
        scope = req.path.split("scope=", 1)[1].split("&")[0] if "scope=" in req.path else ""
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": "tok:" + scope}).encode()
    realm = servers(token)

    def registry(req):
        auth = req.headers.get("Authorization", "")
        repo = req.path.split("/")[2]
        if not auth.startswith("Bearer ") or f"repository%3A{repo}%3A" not in auth:
            return 401, {"WWW-Authenticate": f'Bearer realm="http://{realm_host_of(realm)}/token",'
                                             f'service="reg",scope="repository:{repo}:pull"'}, b""
        return 200, {"Content-Type": "application/json"}, json.dumps({"name": repo, "tags": ["v1"]}).encode()
    return servers(registry), realm


def test_a_token_realm_over_plain_http_is_refused_unless_that_host_is_insecure(servers):
    reg, realm = token_registry(servers, lambda realm: realm.host)
    with RegistryClient(reg.host, Settings(insecure_hosts=(reg.host,))) as c:
        with pytest.raises(RegistryConfigError) as err:
            c.list_tags("team/app")
        assert "refusing http://" + realm.host in str(err.value)
    assert realm.seen == []                                     # nothing was sent to it
    with RegistryClient(reg.host, Settings(insecure_hosts=(reg.host, realm.host))) as c:
        assert c.list_tags("team") == ["v1"]


def test_a_token_is_used_only_for_the_scope_it_was_issued_for(servers):
    reg, realm = token_registry(servers, lambda realm: realm.host)
    with RegistryClient(reg.host, Settings(insecure_hosts=(reg.host, realm.host))) as c:
        assert c.list_tags("alpha") == ["v1"]
        assert c.list_tags("beta") == ["v1"]
        assert c.list_tags("alpha") == ["v1"]                 # its own token, cached
    sent = [(path.split("/")[2], h.get("Authorization", "")) for _, path, h in reg.seen]
    assert [t for repo, t in sent if repo == "beta" and "alpha" in t] == []     # alpha's token never goes to beta
    assert len([p for _, p, _ in realm.seen]) == 2                             # one token per scope


def test_a_200_answer_to_a_range_request_restarts_from_zero(servers, tmp_path):
    reg = servers(lambda req: blob_answer(req, honour_range=False))
    out = tmp_path / "out"
    half = len(BLOB) // 2
    out.write_bytes(BLOB[:half])
    prefix = "sha256:" + hashlib.sha256(BLOB[:half]).hexdigest()
    with RegistryClient(reg.host, Settings(insecure_hosts=(reg.host,))) as c:
        c.download_blob("team/app", BlobRange(DIGEST, str(out), 0, len(BLOB)), have=half, have_digest=prefix)
    assert out.read_bytes() == BLOB                            # written from 0, not appended
    assert [h.get("Range") for _, _, h in reg.seen] == [f"bytes={half}-"]


def test_the_bytes_already_on_disk_are_verified_with_the_tail(servers, tmp_path):
    """A resumed download trusts no byte it did not check: a prefix that differs from the one the
    resume point recorded restarts from 0; without a recorded prefix digest, the whole range
    (prefix + fetched tail) must hash to the blob's digest or nothing claims it complete."""
    reg = servers(lambda req: blob_answer(req))
    half = len(BLOB) // 2
    damaged = bytes([BLOB[0] ^ 1]) + BLOB[1:half]
    prefix = "sha256:" + hashlib.sha256(BLOB[:half]).hexdigest()
    out = tmp_path / "out"
    out.write_bytes(damaged)
    with RegistryClient(reg.host, Settings(insecure_hosts=(reg.host,))) as c:
        reused = c.download_blob("team/app", BlobRange(DIGEST, str(out), 0, len(BLOB)), have=half, have_digest=prefix)
        assert reused == 0 and out.read_bytes() == BLOB
        assert reg.seen[-1][2].get("Range") is None             # fetched whole
        out.write_bytes(damaged)
        with pytest.raises(DigestMismatchError):
            c.download_blob("team/app", BlobRange(DIGEST, str(out), 0, len(BLOB)), have=half)
        assert reg.seen[-1][2].get("Range") == f"bytes={half}-"

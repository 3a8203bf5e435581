"""A token server for the distribution token-auth spec, so the bearer-token flow runs against the
real registry: docker-registry is configured with `auth.token` (realm = this server, rootcertbundle
= its certificate) and verifies the JWTs (RS256, x5c header) this server issues.

Policy: a user with the right password gets every action asked for; anyone (no credentials) gets
`pull` on the repositories in `public`; a wrong password gets 401. Each token request is recorded.
Signing uses the openssl CLI (no crypto library in the test environment).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler

from .httpd import LoopbackServer

SERVICE = "thaw-test-registry"
ISSUER = "thaw-test-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(LoopbackServer):
    def __init__(self, directory: str, users: dict[str, str], public: tuple[str, ...] = (), ttl_s: int = 300):
        self.dir, self.users, self.public, self.ttl_s = directory, users, set(public), ttl_s
        os.makedirs(directory, exist_ok=True)
        self.key = os.path.join(directory, "token.key")
        self.cert = os.path.join(directory, "token.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
                        "-out", self.cert, "-days", "2", "-subj", "/CN=thaw test token issuer"],
                       check=True, capture_output=True, timeout=60)
        der = subprocess.run(["openssl", "x509", "-in", self.cert, "-outform", "DER"], check=True,
                             capture_output=True, timeout=30).stdout
        self._x5c = base64.b64encode(der).decode()
        self.requests: list[dict] = []  # {"user", "scopes", "granted"}
        super().__init__(self._handler())

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict[str, str]:
        """The `auth.token` section for RegistryServer(token=...)."""
        return {"realm": self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": self.cert}

    def issue(self, user: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + self.ttl_s, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key], input=signing_input.encode(),
                             check=True, capture_output=True, timeout=30).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository":
                continue
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user else [a for a in wanted if a == "pull" and name in self.public]
            if allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
        return access

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if server.users.get(name) != pw:
                        server.requests.append({"user": name, "scopes": query.get("scope", []), "granted": None})
                        return self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    user = name
                scopes = query.get("scope", [])
                access = server._grant(user, scopes)
                server.requests.append({"user": user, "scopes": scopes, "granted": access})
                token = server.issue(user or "", access)
                self._send(200, {"token": token, "access_token": token, "expires_in": server.ttl_s,
                                 "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

            def _send(self, status: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

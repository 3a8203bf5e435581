"""A real OCI registry for tests and benchmarks: Debian's `docker-registry` (CNCF distribution 2.8)
on 127.0.0.1 and a free port, with its own storage directory, optionally htpasswd auth, TLS from a
CA made here (openssl CLI), or bearer-token auth against a token server given by the caller.

  ca = TestCA(dir)                  a CA and a server certificate for 127.0.0.1/localhost
  reg = RegistryServer(dir, tls=ca, users={"alice": "pw"}); reg.start(); ...; reg.stop()
  reg.host                          "127.0.0.1:PORT"
  reg.auth_config(path, user, pw)   a docker-style config.json with credentials for it
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid

REGISTRY_BIN = "docker-registry"
START_TIMEOUT_S = 15
USER, PASSWORD = "alice", "s3cret-pw"  # the htpasswd / token-server user of the fixtures


def new_repo(prefix: str = "thaw/t") -> str:
    """A repository name no other test uses (tests share a session registry)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def missing_tools() -> str | None:
    for tool, pkg in ((REGISTRY_BIN, "docker-registry"), ("htpasswd", "apache2-utils"), ("openssl", "openssl")):
        if not shutil.which(tool):
            return f"needs {tool} (Debian package {pkg}; install/node.sh --dev installs it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class TestCA:
    """A throw-away CA (ca.pem) and a server key/certificate it signed for 127.0.0.1 and
    localhost (server.pem, server.key). EC P-256 keys: quick to make."""
    __test__ = False  # not a pytest test class

    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.ca = os.path.join(directory, "ca.pem")
        self.ca_key = os.path.join(directory, "ca.key")
        self.cert = os.path.join(directory, "server.pem")
        self.key = os.path.join(directory, "server.key")
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", self.ca_key, "-out", self.ca, "-days", "2", "-subj", "/CN=thaw test CA")
        csr = os.path.join(directory, "server.csr")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", self.key, "-out", csr, "-subj", "/CN=127.0.0.1")
        ext = os.path.join(directory, "server.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                    "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key, "-CAcreateserial",
                 "-out", self.cert, "-days", "2", "-extfile", ext)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)


class RegistryServer:
    """One docker-registry process. `users`: htpasswd users (bcrypt); `token`: a dict with realm,
    service, issuer and rootcertbundle for bearer-token auth instead. Storage survives stop()
    and start() (same port), so a test can take the registry away and bring it back."""

    def __init__(self, directory: str, *, tls: TestCA | None = None, users: dict[str, str] | None = None,
                 token: dict[str, str] | None = None, port: int | None = None):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.storage = os.path.join(directory, "storage")
        self.tls, self.users, self.token = tls, users or {}, token
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(directory, "registry.log")
        self.config_path = os.path.join(directory, "config.yml")
        self._write_config()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _write_config(self) -> None:
        cfg: dict = {
            "version": 0.1,
            "log": {"level": "info", "fields": {"service": "registry"}},
            "storage": {"filesystem": {"rootdirectory": self.storage}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            # A fixed secret: upload sessions stay valid across a restart of this registry.
            "http": {"addr": self.host, "secret": "thaw-test-secret", "headers": {"X-Content-Type-Options": ["nosniff"]}},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.tls:
            cfg["http"]["tls"] = {"certificate": self.tls.cert, "key": self.tls.key}
        if self.users:
            htpasswd = os.path.join(self.dir, "htpasswd")
            with open(htpasswd, "w") as f:
                for user, pw in self.users.items():
                    line = subprocess.run(["htpasswd", "-Bbn", user, pw], check=True, capture_output=True,
                                          text=True, timeout=30).stdout.strip()
                    f.write(line + "\n")
            cfg["auth"] = {"htpasswd": {"realm": "thaw-test", "path": htpasswd}}
        elif self.token:
            cfg["auth"] = {"token": dict(self.token)}
        # JSON is YAML: no yaml dependency needed to write it.
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=1)

    def start(self) -> RegistryServer:
        assert self.proc is None, "already started"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", self.config_path], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.url} within {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        ctx = self.tls.client_context() if self.tls else None
        try:
            urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=ctx)
            return True
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # up, and asking for auth
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def auth_config(self, path: str, user: str, password: str, host: str | None = None) -> str:
        """A docker-style config.json giving `user`/`password` for this registry (or `host`)."""
        entry = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        with open(path, "w") as f:
            json.dump({"auths": {host or self.host: entry}}, f)
        return path

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

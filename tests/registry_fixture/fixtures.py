"""pytest fixtures for the registry tests. Load with `pytest_plugins = ["registry_fixture.fixtures"]`.

  registry_ca      (session) a TestCA
  tls_registry     (session) docker-registry with TLS and htpasswd user alice
  fresh_registry   (function) its own docker-registry (TLS + htpasswd), for tests that stop it
  token_registry   (session) docker-registry with bearer-token auth from a TokenServer
Each registry fixture yields a Site: the server plus what a client needs (settings, repo names).
Skips when docker-registry, htpasswd or openssl are missing, fails instead under THAW_TEST_STRICT=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from .server import PASSWORD, USER, RegistryServer, TestCA, missing_tools
from .token import TokenServer

STRICT = os.environ.get("THAW_TEST_STRICT") == "1"


@dataclass
class Site:
    server: RegistryServer
    ca: TestCA
    auth_config: str  # docker-style config.json with alice's credentials
    token: TokenServer | None = None

    @property
    def host(self) -> str:
        return self.server.host

    def settings(self, auth_config: str | None = "default", **kw):
        from thaw.shim.registry.transport import Settings
        insecure = tuple(kw.pop("insecure_hosts", ()))
        if self.token:
            insecure += (f"127.0.0.1:{self.token.port}",)  # the test token server speaks plain HTTP
        return Settings(auth_config=self.auth_config if auth_config == "default" else auth_config,
                        ca_bundle=kw.pop("ca_bundle", self.ca.ca), insecure_hosts=insecure, **kw)

    def client(self, auth_config: str | None = "default", **kw):
        from thaw.shim.registry.client import RegistryClient
        client_kw = {k: kw.pop(k) for k in ("chunk_size", "checkpoint_every") if k in kw}
        return RegistryClient(self.host, self.settings(auth_config, **kw), **client_kw)

    def log_lines(self, needle: str) -> list[str]:
        with open(self.server.log_path, errors="replace") as f:
            return [line for line in f if needle in line and '" ' in line and "HTTP/1.1" in line]


def _need_tools() -> None:
    reason = missing_tools()
    if reason:
        if STRICT:
            pytest.fail(f"prerequisite missing under THAW_TEST_STRICT: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def registry_ca(tmp_path_factory) -> TestCA:
    _need_tools()
    return TestCA(str(tmp_path_factory.mktemp("registry-ca")))


def _site(tmp: str, ca: TestCA) -> Site:
    server = RegistryServer(os.path.join(tmp, "registry"), tls=ca, users={USER: PASSWORD})
    return Site(server, ca, server.auth_config(os.path.join(tmp, "config.json"), USER, PASSWORD))


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory, registry_ca):
    site = _site(str(tmp_path_factory.mktemp("tls-registry")), registry_ca)
    site.server.start()
    yield site
    site.server.stop()


@pytest.fixture
def fresh_registry(tmp_path, registry_ca):
    site = _site(str(tmp_path / "fresh"), registry_ca)
    site.server.start()
    yield site
    site.server.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory, registry_ca):
    _need_tools()
    tmp = str(tmp_path_factory.mktemp("token-registry"))
    token = TokenServer(os.path.join(tmp, "token"), {USER: PASSWORD}, public=("thaw/public",)).start()
    server = RegistryServer(os.path.join(tmp, "registry"), tls=registry_ca, token=token.registry_auth())
    site = Site(server, registry_ca, server.auth_config(os.path.join(tmp, "config.json"), USER, PASSWORD), token)
    server.start()
    yield site
    server.stop()
    token.stop()

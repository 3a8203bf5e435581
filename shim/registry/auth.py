"""Credentials for a registry, from a docker-style config file, and the parts of the
distribution auth protocol that are not HTTP plumbing: challenges and scopes.

Config file (the path is the caller's; docker's own is ~/.docker/config.json):
  {"auths": {"HOST[:PORT]": {"auth": base64("user:password")} | {"username": .., "password": ..}
                           | {"identitytoken": ..}},
   "credHelpers": {"HOST[:PORT]": "NAME"}, "credsStore": "NAME"}
A helper is the program `docker-credential-NAME`, asked with `get` and the host on stdin.
Precedence as docker's: credHelpers for the host, then credsStore, then auths.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from .errors import RegistryConfigError

HELPER_TIMEOUT_S = 30
# A helper answers this (on stdout, exit 1) when it simply has nothing for the host.
_HELPER_NOT_FOUND = "credentials not found"
_CHALLENGE_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    # An OAuth2 refresh token (docker's `identitytoken`): exchanged at the token endpoint by POST.
    identity_token: str = ""
    source: str = ""  # where they came from, for error messages (never the secret)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _host_key(key: str) -> str:
    """`https://host:port/v1/` and `host:port` name the same registry in a config file."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def load_credentials(config_path: str | None, registry: str) -> Credentials | None:
    """The credentials the config file gives `registry`, or None (anonymous). A missing file
    means anonymous, as for docker; an unreadable or malformed one is an error."""
    if not config_path:
        return None
    try:
        with open(config_path, "rb") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryConfigError(f"cannot read registry credentials file {config_path}: {exc}", registry) from exc
    if not isinstance(cfg, dict):
        raise RegistryConfigError(f"registry credentials file {config_path} is not a JSON object", registry)
    host = registry.lower()
    helpers = {_host_key(k): v for k, v in (cfg.get("credHelpers") or {}).items()}
    if host in helpers:
        return _from_helper(str(helpers[host]), registry, config_path)
    if cfg.get("credsStore"):
        creds = _from_helper(str(cfg["credsStore"]), registry, config_path)
        if creds is not None:
            return creds
    for key, entry in (cfg.get("auths") or {}).items():
        if _host_key(key) == host and isinstance(entry, dict):
            return _from_auths_entry(entry, registry, config_path)
    return None


def _from_auths_entry(entry: dict[str, Any], registry: str, path: str) -> Credentials | None:
    source = f"{path} (auths)"
    if entry.get("identitytoken"):
        return Credentials(identity_token=str(entry["identitytoken"]), source=source)
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryConfigError(f"malformed 'auth' for {registry} in {path}: not base64 of user:password", registry) from exc
        if not sep:
            raise RegistryConfigError(f"malformed 'auth' for {registry} in {path}: no ':' between user and password", registry)
        return Credentials(user, password, source=source)
    if entry.get("username") or entry.get("password"):
        return Credentials(str(entry.get("username", "")), str(entry.get("password", "")), source=source)
    return None


def _from_helper(name: str, registry: str, path: str) -> Credentials | None:
    prog = f"docker-credential-{name}"
    exe = shutil.which(prog)
    if not exe:
        raise RegistryConfigError(f"{path} names the credential helper {name!r} for {registry}, but {prog} is not on PATH",
                          registry)
    try:
        proc = subprocess.run([exe, "get"], input=registry, capture_output=True, text=True, timeout=HELPER_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RegistryConfigError(f"credential helper {prog} failed: {exc}", registry) from exc
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        if _HELPER_NOT_FOUND in out.lower():
            return None
        raise RegistryConfigError(f"credential helper {prog} failed (exit {proc.returncode}): {out[:200]}", registry)
    try:
        ans = json.loads(proc.stdout)
        user, secret = str(ans.get("Username", "")), str(ans["Secret"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryConfigError(f"credential helper {prog} printed no JSON with a Secret", registry) from exc
    source = f"credential helper {prog}"
    if user == "<token>":  # docker's marker for an identity (refresh) token
        return Credentials(identity_token=secret, source=source)
    return Credentials(user, secret, source=source)


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme (lowercase) and its parameters."""
    scheme: str
    params: dict[str, str]

    @property
    def scopes(self) -> tuple[str, ...]:
        # A bearer challenge's scope may list several, space-separated.
        return tuple(self.params.get("scope", "").split())


def parse_challenge(header: str) -> Challenge | None:
    """Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {}
    for key, val in _CHALLENGE_PARAM.findall(rest):
        if val.startswith('"'):
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params[key.lower()] = val
    return Challenge(scheme.lower(), params)


def repository_scope(repository: str, actions: str) -> str:
    """`repository:REPO:pull` or `repository:REPO:pull,push` (distribution token scope)."""
    return f"repository:{repository}:{actions}"


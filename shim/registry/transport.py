"""HTTP to one registry: connection pool, TLS, plain-HTTP policy, authentication, redirects and
the mapping of HTTP failures to this package's exceptions. One Transport is shared by all the
threads of a transfer (urllib3's PoolManager is thread-safe; the token cache has a lock).

Authentication follows the distribution spec: a request goes out with what we already know
(Basic credentials once the registry asked for Basic, or a cached bearer token for the request's
scope); on 401 the challenge says what to do, and the request is sent once more. Bodies are
factories, so a request can be re-sent; an upload sends its body only after a bodiless request
(the POST that opens the session) has settled authentication.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import urllib3
import urllib3.connection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import SSLError as Urllib3SSLError

from ..safetext import REMOTE_MAX, redact
from .auth import Challenge, Credentials, load_credentials, parse_challenge
from .errors import (
    AuthError,
    Cancelled,
    DigestMismatchError,
    NetworkError,
    NotFoundError,
    ProtocolError,
    RegistryConfigError,
    RegistryError,
)

USER_AGENT = "thaw-registry/0.1"
MAX_REDIRECTS = 5
# A token's lifetime when the server names none (the token spec's default), and how long before
# its end we stop using it.
DEFAULT_TOKEN_TTL_S = 60
TOKEN_MARGIN_S = 10
Body = Callable[[], Iterable[bytes]] | bytes | None
Where = tuple[str, str]  # (repository, digest) a request is about, for its errors


@dataclass
class Settings:
    """How to reach registries. `insecure_hosts`: HOST[:PORT] values spoken to over plain HTTP
    (and only those). `ca_bundle`: a PEM file trusted in addition to the system's CAs."""
    auth_config: str | None = None
    ca_bundle: str | None = None
    insecure_hosts: tuple[str, ...] = ()
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    pool_size: int = 16
    user_agent: str = USER_AGENT
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Token:
    value: str
    expires: float


class Transport:
    def __init__(self, registry: str, settings: Settings | None = None):
        self.registry = registry
        self.settings = settings or Settings()
        self._insecure = {h.lower() for h in self.settings.insecure_hosts}
        self.scheme = "http" if registry.lower() in self._insecure else "https"
        self.base = f"{self.scheme}://{registry}"
        self._pool = urllib3.PoolManager(
            num_pools=8, maxsize=self.settings.pool_size, block=False, retries=False,
            ssl_context=self._ssl_context(),
            timeout=urllib3.Timeout(connect=self.settings.connect_timeout_s, read=self.settings.read_timeout_s))
        self._lock = threading.Lock()
        self._aborted = False
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._pool.pool_classes_by_scheme = _tracking_pools(self._connections, self._lock)
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._basic = False  # the registry asked for Basic: send it with every request
        self._bearer: Challenge | None = None  # the registry's last bearer challenge
        self._tokens: dict[str, _Token] = {}

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()  # the system's CAs
        if self.settings.ca_bundle:
            try:
                ctx.load_verify_locations(cafile=self.settings.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise RegistryConfigError(f"cannot load CA bundle {self.settings.ca_bundle}: {exc}", self.registry) from exc
        return ctx

    def close(self) -> None:
        self._pool.clear()

    def abort(self) -> None:
        """Stop every request of this transport now, from any thread: each open connection is
        shut down (a blocked read returns at once, whatever phase it is in: headers, body, a
        token) and every later request raises Cancelled. What a pull deadline and a cancelled
        pull use; a registry that trickles bytes cannot hold a transfer past it."""
        with self._lock:
            self._aborted = True
            conns = list(self._connections)
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def credentials(self) -> Credentials | None:
        with self._lock:
            if not self._creds_loaded:
                self._creds = load_credentials(self.settings.auth_config, self.registry)
                self._creds_loaded = True
            return self._creds

    # --- requests -------------------------------------------------------------------------------

    def request(self, method: str, url: str, *, repository: str = "", digest: str = "", scopes: tuple[str, ...] = (),
                headers: dict[str, str] | None = None, body: Body = None, stream: bool = False,
                expect: tuple[int, ...] = (200,), allow_redirects: bool = False) -> urllib3.BaseHTTPResponse:
        """Sends one request (path or absolute URL), authenticating as needed. Returns the
        response if its status is in `expect`, else raises the matching RegistryError. With
        `stream` the body is left unread for the caller (who must release the response)."""
        if url.startswith("/"):
            url = self.base + url
        where = (repository, digest)
        tried_auth = False
        for _ in range(MAX_REDIRECTS + 1):
            if self.scheme == "http" and url.startswith(f"https://{self.registry}/"):
                url = "http" + url[len("https"):]     # a loopback registry found to speak HTTP (_send)
            self._check_url(url, where)
            hdrs = {"User-Agent": self.settings.user_agent, **self.settings.extra_headers, **(headers or {})}
            same_host = _origin(url) == _origin(self.base)
            if same_host:  # credentials never leave the registry's own origin
                auth = self._authorization(scopes)
                if auth:
                    hdrs["Authorization"] = auth
            resp = self._send(method, url, hdrs, body, where)
            if resp.status == 401 and same_host and not tried_auth:
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                _drain(resp)
                self._on_challenge(challenge, scopes, where, sent_basic=hdrs.get("Authorization", "").startswith("Basic "))
                tried_auth = True
                continue
            if allow_redirects and resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urllib.parse.urljoin(url, resp.headers["Location"])
                _drain(resp)
                continue
            if resp.status in expect:
                if not stream:
                    resp.read(cache_content=True)  # then resp.data holds it
                    resp.release_conn()
                return resp
            raise self._error(method, url, resp, where)
        raise ProtocolError(f"more than {MAX_REDIRECTS} redirects for {method} {url}", self.registry, *where)

    def _send(self, method: str, url: str, headers: dict[str, str], body: Body, where: Where) -> urllib3.BaseHTTPResponse:
        if self._aborted:
            raise Cancelled(f"{method} {_strip_query(url)}: transfer stopped", self.registry, *where)
        data = body() if callable(body) else body
        try:
            return self._pool.urlopen(method, url, body=data, headers=headers, redirect=False, retries=False,
                                      preload_content=False, decode_content=False)
        except Urllib3SSLError as exc:
            plain = "WRONG_VERSION_NUMBER" in str(exc) or "wrong version number" in str(exc)
            if plain and self.scheme == "https" and url.startswith(self.base + "/") and is_loopback(self.registry):
                # As docker does for a registry on this host: HTTPS first, then plain HTTP.
                self.scheme, self._insecure = "http", self._insecure | {self.registry.lower()}
                self.base = f"http://{self.registry}"
                return self._send(method, "http" + url[len("https"):], headers, body, where)
            hint = ""
            if plain:
                hint = " (the registry seems to speak plain HTTP: list it in the insecure hosts to allow that)"
            elif "CERTIFICATE_VERIFY_FAILED" in str(exc):
                hint = " (certificate not trusted: add its CA to the CA bundle)"
            raise NetworkError(f"TLS failure for {method} {_strip_query(url)}: {_reason(exc)}{hint}",
                               self.registry, *where) from exc
        except Urllib3Error as exc:
            raise NetworkError(f"{method} {_strip_query(url)}: {_reason(exc)}", self.registry, *where) from exc
        except OSError as exc:
            raise NetworkError(f"{method} {_strip_query(url)}: {exc}", self.registry, *where) from exc

    def _check_url(self, url: str, where: Where) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            return
        if parts.scheme == "http" and parts.netloc.lower() in self._insecure:
            return
        raise RegistryConfigError(f"refusing {parts.scheme}://{parts.netloc}: plain HTTP only for the hosts listed as "
                          f"insecure ({', '.join(sorted(self._insecure)) or 'none'})", self.registry, *where)

    # --- authentication -------------------------------------------------------------------------

    def _authorization(self, scopes: tuple[str, ...]) -> str | None:
        with self._lock:
            if self._basic and self._creds:
                return self._creds.basic()
            if self._bearer is not None:
                tok = self._tokens.get(_scope_key(scopes))
                if tok and tok.expires > time.monotonic():
                    return "Bearer " + tok.value
        return None

    def _on_challenge(self, challenge: Challenge | None, scopes: tuple[str, ...], where: Where, sent_basic: bool) -> None:
        creds = self.credentials()
        who = f"credentials from {creds.source}" if creds else f"no credentials (config: {self.settings.auth_config or 'none'})"
        if challenge is None:
            raise AuthError(f"401 Unauthorized without a WWW-Authenticate challenge; {who}", self.registry, *where)
        if challenge.scheme == "basic":
            if creds is None or not (creds.username or creds.password):
                raise AuthError(f"the registry requires a login (Basic auth) and there are {who}", self.registry, *where)
            if sent_basic:  # we sent them and they were refused
                raise AuthError(f"login refused with {who}", self.registry, *where)
            with self._lock:
                self._basic = True
            return
        if challenge.scheme == "bearer":
            wanted = tuple(dict.fromkeys(challenge.scopes + scopes))
            token = self._fetch_token(challenge, wanted, creds, where)
            with self._lock:
                self._bearer = challenge
                self._tokens[_scope_key(scopes)] = token
            return
        raise AuthError(f"unsupported authentication scheme {challenge.scheme!r}", self.registry, *where)

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...], creds: Credentials | None, where: Where) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError("bearer challenge without a realm", self.registry, *where)
        self._check_url(realm, where)
        query = [("scope", s) for s in scopes]
        if challenge.params.get("service"):
            query.insert(0, ("service", challenge.params["service"]))
        hdrs = {"User-Agent": self.settings.user_agent}
        if creds and creds.identity_token:
            # OAuth2 refresh-token grant (docker's identity tokens).
            form = [("grant_type", "refresh_token"), ("refresh_token", creds.identity_token), ("client_id", "thaw"),
                    *query]
            method, url = "POST", realm
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            method, data = "GET", None
            url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
            if creds and (creds.username or creds.password):
                hdrs["Authorization"] = creds.basic()
        resp = self._send(method, url, hdrs, data, where)
        raw = resp.read()
        if resp.status in (401, 403):
            who = f"credentials from {creds.source}" if creds else "anonymous"
            raise AuthError(f"token service {_strip_query(realm)} refused {who} for {' '.join(scopes) or 'no scope'} "
                            f"(HTTP {resp.status})", self.registry, *where)
        if resp.status != 200:
            raise AuthError(f"token service {_strip_query(realm)} answered HTTP {resp.status}", self.registry, *where)
        try:
            ans = json.loads(raw)
            value = ans.get("token") or ans.get("access_token")
            ttl = float(ans.get("expires_in") or DEFAULT_TOKEN_TTL_S)
        except (ValueError, AttributeError, TypeError) as exc:
            raise AuthError(f"token service {_strip_query(realm)} sent no JSON token", self.registry, *where) from exc
        if not value:
            raise AuthError(f"token service {_strip_query(realm)} sent no token", self.registry, *where)
        return _Token(str(value), time.monotonic() + max(ttl - TOKEN_MARGIN_S, 1.0))

    def _secrets(self) -> tuple[str, ...]:
        """Every credential value this transport may have sent: none may appear in a message."""
        with self._lock:
            creds = self._creds
            tokens = [t.value for t in self._tokens.values()]
        out = list(tokens)
        if creds is not None:
            out += [creds.password or "", creds.identity_token or ""]
            if creds.username or creds.password:
                out.append(creds.basic().split(" ", 1)[-1])
        return tuple(s for s in out if s)

    # --- errors ---------------------------------------------------------------------------------

    def _error(self, method: str, url: str, resp: urllib3.BaseHTTPResponse, where: Where) -> RegistryError:
        try:
            raw = resp.read(64 << 10)
        except Exception:  # noqa: BLE001 - the body only decorates the message
            raw = b""
        finally:
            resp.release_conn()
        codes, detail = _error_body(raw)
        detail = redact(detail, self._secrets())[:REMOTE_MAX]
        what = f"{method} {_strip_query(url)}: HTTP {resp.status}{(' ' + detail) if detail else ''}"
        if resp.status == 401:
            creds = self.credentials()
            return AuthError(f"{what} (credentials from {creds.source if creds else 'nowhere'})", self.registry, *where)
        if resp.status == 403:
            return AuthError(f"{what} (access denied)", self.registry, *where)
        if resp.status == 404:
            return NotFoundError(what, self.registry, *where)
        if "DIGEST_INVALID" in codes or "SIZE_INVALID" in codes:
            return DigestMismatchError(what, self.registry, *where)
        if codes & {"BLOB_UNKNOWN", "MANIFEST_UNKNOWN", "NAME_UNKNOWN", "MANIFEST_BLOB_UNKNOWN"}:
            return NotFoundError(what, self.registry, *where)
        if resp.status in (429, 502, 503, 504):
            return NetworkError(f"{what} (registry unavailable; try again later)", self.registry, *where)
        return ProtocolError(what, self.registry, *where)


def _tracking_pools(live: weakref.WeakSet[Any], lock: threading.Lock) -> dict[str, type[urllib3.HTTPConnectionPool]]:
    """urllib3 pool classes whose connections register themselves in `live` once connected, so
    that Transport.abort can shut each one down (urllib3 does not track connections in use)."""
    def tracked(base: type[Any]) -> type[Any]:
        class Tracked(base):  # type: ignore[misc]  # either connection class: mypy wants a static base
            def connect(self) -> None:
                super().connect()
                with lock:
                    live.add(self)
        return Tracked

    class HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = tracked(urllib3.connection.HTTPConnection)

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = tracked(urllib3.connection.HTTPSConnection)
    return {"http": HTTPPool, "https": HTTPSPool}


def _error_body(raw: bytes) -> tuple[set[str], str]:
    """The distribution spec's `{"errors": [{"code", "message", "detail"}]}`, if that is what came."""
    try:
        errs = json.loads(raw)["errors"]
        codes = {str(e.get("code", "")) for e in errs}
        return codes, "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errs)
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw[:200].decode("utf-8", "replace").strip()
        return set(), text


def _scope_key(scopes: tuple[str, ...]) -> str:
    return " ".join(sorted(scopes))


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def is_loopback(registry: str) -> bool:
    """localhost or an address in 127.0.0.0/8 or ::1, with or without a port: the registries docker
    speaks to over plain HTTP when HTTPS fails, with no insecure-registries entry needed."""
    if registry.startswith("["):
        host = registry[1:registry.find("]")]
    else:
        host = registry.partition(":")[0] if registry.count(":") == 1 else registry
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _strip_query(url: str) -> str:
    """URLs in messages without their query (upload state, pre-signed storage signatures)."""
    return url.split("?", 1)[0]


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


def _drain(resp: urllib3.BaseHTTPResponse) -> None:
    try:
        resp.read(1 << 20)
    except Exception:  # noqa: BLE001 - a broken body of a response we discard does not matter
        pass
    resp.release_conn()

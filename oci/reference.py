"""Registry references: `REGISTRY/REPOSITORY[:TAG][@sha256:HEX]`.

A snapshot name never contains `/`; a value that does is a registry reference. Unlike Docker,
there is no implicit registry (`docker.io`) and no implicit `library/`: the first component must
be a host — it contains `.` or `:`, or is `localhost` — so a reference always says where it lives.
The repository and tag grammars are the OCI distribution spec's. Pure parsing, no I/O; kept free
of dataclasses and typing so that annotation parsing stays cheap.
"""

from __future__ import annotations

import re

from . import ThawError

DEFAULT_TAG = "latest"
# Distribution's reference grammar, anchored per part.
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"^(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
# Distribution limits REGISTRY/REPOSITORY to 255 characters; many registries enforce it.
MAX_NAME = 255


class InvalidReference(ThawError, ValueError):
    """A value is not a valid registry reference; the message says which part and why."""


def is_registry_reference(value: str) -> bool:
    """A snapshot value names a registry reference exactly when it contains `/`."""
    return "/" in value


class Reference:
    """A parsed registry reference. `tag` and `digest` are None when absent; both may be set
    (`repo:tag@sha256:...`), in which case the digest is what is fetched."""

    __slots__ = ("digest", "registry", "repository", "tag")

    def __init__(self, registry: str, repository: str, tag: str | None = None, digest: str | None = None):
        self.registry, self.repository, self.tag, self.digest = registry, repository, tag, digest

    @classmethod
    def parse(cls, value: str) -> Reference:
        text = value.strip()
        if not text:
            raise InvalidReference("empty registry reference")
        if not is_registry_reference(text):
            raise InvalidReference(f"{value!r} is not a registry reference: want REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]")
        name, at, digest = text.partition("@")
        if at:
            check_digest(digest, value)
        registry, _, rest = name.partition("/")
        # A tag follows the last `:` after the last `/` (a registry port is before the first `/`).
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        tag = None
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1:]
            if not _TAG.match(tag):
                raise InvalidReference(f"invalid tag {tag!r} in {value!r}: want [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")
        check_registry(registry, value)
        check_repository(rest, value)
        if len(registry) + 1 + len(rest) > MAX_NAME:
            raise InvalidReference(f"registry and repository of {value!r} are longer than {MAX_NAME} characters")
        return cls(registry, rest, tag, digest or None)

    @property
    def reference(self) -> str:
        """What names the manifest in `/v2/REPO/manifests/<reference>`: the digest if given, else
        the tag, else `latest` (Docker's convention for a bare repository)."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        check_digest(digest, digest)
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def __repr__(self) -> str:
        return f"Reference({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def check_registry(host: str, value: str = "") -> str:
    what = f" in {value!r}" if value else ""
    if not host:
        raise InvalidReference(f"missing registry host{what}")
    if not ("." in host or ":" in host or host == "localhost"):
        raise InvalidReference(
            f"{host!r}{what} is not a registry host (it must contain '.' or ':', or be 'localhost'; "
            f"there is no default registry: write e.g. docker.io/{host}/...)")
    if not _HOST.match(host):
        raise InvalidReference(f"invalid registry host {host!r}{what}: want HOST[:PORT]")
    port = host.rpartition(":")[2] if not host.endswith("]") and ":" in host else None
    if port is not None and not 0 < int(port) < 65536:
        raise InvalidReference(f"invalid port in registry host {host!r}{what}")
    return host


def check_repository(repo: str, value: str = "") -> str:
    what = f" in {value!r}" if value else ""
    if not repo:
        raise InvalidReference(f"missing repository{what}: want REGISTRY/REPOSITORY")
    for part in repo.split("/"):
        if not _PATH_COMPONENT.match(part):
            hint = " (repositories are lowercase)" if part.lower() != part else ""
            raise InvalidReference(
                f"invalid repository component {part!r}{what}{hint}: want [a-z0-9]+ joined by '.', '_', '__' or '-'")
    return repo


def check_digest(digest: str, value: str = "", error: type[Exception] = InvalidReference) -> str:
    """`digest` if it is `sha256:` and 64 lowercase hex digits (the one digest check of oci/);
    else `error` (the caller's format error) naming what is wrong, and where when `value` is given."""
    what = f" in {value!r}" if value and value != digest else ""
    if _DIGEST.match(digest):
        return digest
    if _ANY_DIGEST.match(digest) and not digest.startswith("sha256:"):
        raise error(f"unsupported digest algorithm {digest.partition(':')[0]!r}{what}: only sha256")
    raise error(f"invalid digest {digest!r}{what}: want sha256: and 64 lowercase hex digits")

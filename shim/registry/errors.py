"""The registry package's exceptions: one base, one subclass per kind of failure a caller reacts
to differently. Every message names the registry, and the repository and digest when known."""

from __future__ import annotations

from thaw.oci import ThawError

from ..safetext import remote as _remote_text

MESSAGE_MAX = 1000  # characters of one error message (a registry's body inside it is capped lower)


class RegistryError(ThawError):
    """Base of every error raised by thaw.shim.registry."""

    def __init__(self, message: str, registry: str = "", repository: str = "", digest: str = ""):
        # Messages carry what registries sent (error bodies, headers): they reach events.log and
        # terminals, so no control character, no credential and no unbounded length gets in.
        message = _remote_text(message, limit=MESSAGE_MAX)
        registry, repository = _remote_text(registry, limit=300), _remote_text(repository, limit=300)
        self.registry, self.repository, self.digest = registry, repository, digest
        self.reason = message
        where = "/".join(p for p in (registry, repository) if p)
        if digest:
            where = f"{where}@{digest}" if where else digest
        super().__init__(f"{where}: {message}" if where else message)


class RegistryConfigError(RegistryError):
    """The caller's settings cannot work: plain HTTP to a host not listed as insecure, an
    unreadable credentials file or CA bundle, a credential helper that is missing or fails."""


class AuthError(RegistryError):
    """The registry refused the credentials (or there were none and it wants some)."""


class NotFoundError(RegistryError):
    """The repository, manifest or blob does not exist (or is hidden by access control)."""


class DigestMismatchError(RegistryError):
    """Bytes did not match their digest (or their announced size): the data is not trusted."""


class ProtocolError(RegistryError):
    """The registry answered something the distribution spec does not allow here."""


class NetworkError(RegistryError):
    """Connection refused, reset or timed out, TLS failure, or a transfer cut short. Retrying
    later may succeed; an interrupted blob download resumes."""


class LocalFileError(RegistryError):
    """Reading a source range or writing a destination range failed (disk full, missing file)."""


class Cancelled(RegistryError):
    """The transfer was cancelled (by the caller, or because another blob failed)."""

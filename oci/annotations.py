"""thaw's annotation keys and their parsing (the pod/container contract).

Imported on the runtime's hot path: plain classes, and `re` only when a reference is parsed.
"""

from __future__ import annotations

from . import ThawError

SNAPSHOT = "thaw.dev/snapshot"
CAPTURE = "thaw.dev/capture"
READY = "thaw.dev/ready"
QUIESCE = "thaw.dev/quiesce"
RESUME = "thaw.dev/resume"
REQUIRED = "thaw.dev/required"
PULL = "thaw.dev/pull"          # "wait": wait (bounded) for a registry snapshot the node lacks
PUSH = "thaw.dev/push"          # "true": push what auto-capture captured to the registry reference

# Set by containerd's CRI plugin.
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_IMAGE_NAME = "io.kubernetes.cri.image-name"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# Set by containerd for non-CRI clients (ctr) and by image builders.
OCI_IMAGE_REF = "org.opencontainers.image.ref.name"

# The owner namespace of containers that no Kubernetes namespace names (Podman, Docker, ctr, the
# CLI): a name no Kubernetes namespace can have (those are DNS labels).
LOCAL_NAMESPACE = "_local"
DEFAULT_TAG = "latest"
_NAME = r"^[a-z0-9][a-z0-9._-]{0,127}$"
_TAG = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"


class AnnotationError(ThawError):
    """A thaw annotation is present but malformed."""


class SnapshotRef:
    """A snapshot's name in the store: NAME:TAG, or a registry reference (REGISTRY/REPO:TAG or
    REGISTRY/REPO@sha256:...), which is the local name of what was pulled from it (or captured
    to be pushed there) — the same string is a valid OCI ref.name either way. `remote` holds the
    parsed registry reference (oci/reference.py), None for a plain name."""
    __slots__ = ("name", "tag", "remote")

    def __init__(self, name: str, tag: str = DEFAULT_TAG, remote=None):
        self.name, self.tag, self.remote = name, tag, remote

    def __str__(self) -> str:
        return str(self.remote) if self.remote is not None else f"{self.name}:{self.tag}"

    def key(self) -> str:
        """A file-name-safe key (lock files): a registry reference is hashed."""
        if self.remote is None:
            return f"{self.name}_{self.tag}"
        import hashlib
        return "r-" + hashlib.sha256(str(self).encode()).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"SnapshotRef({self.name!r}, {self.tag!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SnapshotRef) and (self.name, self.tag) == (other.name, other.tag)

    def __hash__(self) -> int:
        return hash((self.name, self.tag))

    @classmethod
    def parse(cls, text: str) -> "SnapshotRef":
        from .reference import is_registry_reference
        if is_registry_reference(text):
            return cls.registry(text)
        name, sep, tag = text.strip().partition(":")
        if not sep:
            tag = DEFAULT_TAG
        import re
        # Names become file-system keys and OCI ref names: keep them to a safe alphabet.
        if not re.match(_NAME, name):
            raise AnnotationError(f"invalid snapshot name {name!r} in {text!r}: want [a-z0-9][a-z0-9._-]*")
        if ".." in name or not re.match(_TAG, tag):
            raise AnnotationError(f"invalid snapshot reference {text!r}: want NAME[:TAG]")
        return cls(name, tag)

    @classmethod
    def registry(cls, text: str) -> "SnapshotRef":
        """A registry reference as a snapshot name; a bare repository means its `latest` tag."""
        from .reference import Reference, ReferenceError
        try:
            ref = Reference.parse(text)
        except ReferenceError as exc:
            raise AnnotationError(str(exc)) from None
        if ref.tag is None and ref.digest is None:
            ref = Reference(ref.registry, ref.repository, DEFAULT_TAG)
        return cls(f"{ref.registry}/{ref.repository}", ref.digest or ref.tag or DEFAULT_TAG, ref)


class ThawRequest:
    """What a container's annotations ask of thaw."""

    def __init__(self, snapshot: SnapshotRef, required: bool = False, capture_on_ready: bool = False,
                 ready: str | None = None, quiesce: str | None = None, resume: str | None = None,
                 pull_wait: bool = False, push: bool = False):
        self.snapshot, self.required, self.capture_on_ready = snapshot, required, capture_on_ready
        self.ready, self.quiesce, self.resume = ready, quiesce, resume
        self.pull_wait, self.push = pull_wait, push


def valid_namespace(ns: str) -> bool:
    """A Kubernetes namespace (a DNS label) or LOCAL_NAMESPACE."""
    if ns == LOCAL_NAMESPACE:
        return True
    import re
    return bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", ns))


def namespace_of(annotations: dict[str, str]) -> str:
    """The namespace a container belongs to: its pod's, else LOCAL_NAMESPACE."""
    ns = annotations.get(CRI_SANDBOX_NAMESPACE) or LOCAL_NAMESPACE
    if not valid_namespace(ns):
        raise AnnotationError(f"{CRI_SANDBOX_NAMESPACE}: {ns!r} is not a namespace name")
    return ns


def is_sandbox(annotations: dict[str, str]) -> bool:
    return annotations.get(CRI_CONTAINER_TYPE) == "sandbox"


def wants_thaw(annotations: dict[str, str]) -> bool:
    """Cheap test used on the hot path: does this container ask for thaw at all?"""
    return SNAPSHOT in annotations and not is_sandbox(annotations)


def is_required(annotations: dict[str, str]) -> bool:
    """`thaw.dev/required` read on its own, so that it holds even when other annotations are bad."""
    return annotations.get(REQUIRED, "").strip().lower() == "true"


def _url(key: str, value: str | None, schemes: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value.startswith(schemes):
        raise AnnotationError(f"{key}: {value!r} must start with one of {', '.join(schemes)}")
    return value


def parse_request(annotations: dict[str, str]) -> ThawRequest:
    """Parse thaw's annotations; raise AnnotationError naming the bad one."""
    required_raw = annotations.get(REQUIRED)
    if required_raw is not None and required_raw.strip().lower() not in ("true", "false"):
        raise AnnotationError(f"{REQUIRED}: {required_raw!r} must be \"true\" or \"false\"")
    capture = annotations.get(CAPTURE)
    if capture is not None and capture.strip() != "on-ready":
        raise AnnotationError(f"{CAPTURE}: {capture!r} is not supported (only \"on-ready\")")
    ready = _url(READY, annotations.get(READY), ("http://", "file:"))
    if capture is not None and ready is None:
        raise AnnotationError(f"{CAPTURE}: on-ready needs {READY}")
    snapshot = SnapshotRef.parse(annotations[SNAPSHOT])
    pull = annotations.get(PULL)
    if pull is not None and pull.strip() not in ("wait", "background"):
        raise AnnotationError(f"{PULL}: {pull!r} must be \"wait\" or \"background\"")
    push = annotations.get(PUSH)
    if push is not None and push.strip().lower() not in ("true", "false"):
        raise AnnotationError(f"{PUSH}: {push!r} must be \"true\" or \"false\"")
    wants_push = push is not None and push.strip().lower() == "true"
    if (pull is not None or wants_push) and snapshot.remote is None:
        raise AnnotationError(f"{PULL if pull is not None else PUSH} needs {SNAPSHOT} to name a registry "
                              f"reference (REGISTRY/REPO:TAG), not {str(snapshot)!r}")
    if wants_push and capture is None:
        raise AnnotationError(f"{PUSH}: pushes what auto-capture captures: it needs {CAPTURE}: on-ready")
    return ThawRequest(
        snapshot=snapshot,
        pull_wait=pull is not None and pull.strip() == "wait",
        push=wants_push,
        required=is_required(annotations),
        capture_on_ready=capture is not None,
        ready=ready,
        quiesce=_url(QUIESCE, annotations.get(QUIESCE), ("http://",)),
        resume=_url(RESUME, annotations.get(RESUME), ("http://",)),
    )

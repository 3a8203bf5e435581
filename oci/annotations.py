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
    __slots__ = ("name", "tag")

    def __init__(self, name: str, tag: str = DEFAULT_TAG):
        self.name, self.tag = name, tag

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    def __repr__(self) -> str:
        return f"SnapshotRef({self.name!r}, {self.tag!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SnapshotRef) and (self.name, self.tag) == (other.name, other.tag)

    def __hash__(self) -> int:
        return hash((self.name, self.tag))

    @classmethod
    def parse(cls, text: str) -> "SnapshotRef":
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


class ThawRequest:
    """What a container's annotations ask of thaw."""

    def __init__(self, snapshot: SnapshotRef, required: bool = False, capture_on_ready: bool = False,
                 ready: str | None = None, quiesce: str | None = None, resume: str | None = None):
        self.snapshot, self.required, self.capture_on_ready = snapshot, required, capture_on_ready
        self.ready, self.quiesce, self.resume = ready, quiesce, resume


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
    return ThawRequest(
        snapshot=SnapshotRef.parse(annotations[SNAPSHOT]),
        required=is_required(annotations),
        capture_on_ready=capture is not None,
        ready=ready,
        quiesce=_url(QUIESCE, annotations.get(QUIESCE), ("http://",)),
        resume=_url(RESUME, annotations.get(RESUME), ("http://",)),
    )

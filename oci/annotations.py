"""thaw's annotation keys and their parsing (the pod/container contract).

Imported on the runtime's hot path: plain classes, and `re` only when a reference is parsed.
"""

from __future__ import annotations

import json
import re

from . import ThawError
from .digest import sha256_hex
from .reference import InvalidReference, Reference, is_registry_reference

TYPE_CHECKING = False  # typing and the reference parser stay unimported until needed
if TYPE_CHECKING:
    from typing import Any

    from .reference import Reference

SNAPSHOT = "thaw.dev/snapshot"
CAPTURE = "thaw.dev/capture"
READY = "thaw.dev/ready"
QUIESCE = "thaw.dev/quiesce"
RESUME = "thaw.dev/resume"
REQUIRED = "thaw.dev/required"
PULL = "thaw.dev/pull"          # "wait": wait (bounded) for a registry snapshot the node lacks
PUSH = "thaw.dev/push"          # "true": push what auto-capture captured to the registry reference
ENGINE = "thaw.dev/engine"      # vllm | sglang: the engine's own sleep/wake API as quiesce/resume steps
ENGINE_URL = "thaw.dev/engine-url"      # where the engine listens inside the container (presets' default port)
ENGINE_STEPS = "thaw.dev/engine-steps"  # custom ordered steps, JSON (see EngineSteps)
WEIGHTS = "thaw.dev/weights"    # weight files or directories (paths inside the container), comma-separated

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
    __slots__ = ("name", "remote", "tag")

    def __init__(self, name: str, tag: str = DEFAULT_TAG, remote: Reference | None = None):
        self.name, self.tag, self.remote = name, tag, remote

    def __str__(self) -> str:
        return str(self.remote) if self.remote is not None else f"{self.name}:{self.tag}"

    def key(self) -> str:
        """A file-name-safe key (lock files): a registry reference is hashed."""
        if self.remote is None:
            return f"{self.name}_{self.tag}"
        return "r-" + sha256_hex(str(self).encode())[:32]

    def __repr__(self) -> str:
        return f"SnapshotRef({self.name!r}, {self.tag!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SnapshotRef) and (self.name, self.tag) == (other.name, other.tag)

    def __hash__(self) -> int:
        return hash((self.name, self.tag))

    @classmethod
    def parse(cls, text: str) -> SnapshotRef:
        if is_registry_reference(text):
            return cls.registry(text)
        name, sep, tag = text.strip().partition(":")
        if not sep:
            tag = DEFAULT_TAG
        # Names become file-system keys and OCI ref names: keep them to a safe alphabet.
        if not re.match(_NAME, name):
            raise AnnotationError(f"invalid snapshot name {name!r} in {text!r}: want [a-z0-9][a-z0-9._-]*")
        if ".." in name or not re.match(_TAG, tag):
            raise AnnotationError(f"invalid snapshot reference {text!r}: want NAME[:TAG]")
        return cls(name, tag)

    @classmethod
    def registry(cls, text: str) -> SnapshotRef:
        """A registry reference as a snapshot name; a bare repository means its `latest` tag."""
        try:
            ref = Reference.parse(text)
        except InvalidReference as exc:
            raise AnnotationError(str(exc)) from None
        if ref.tag is None and ref.digest is None:
            ref = Reference(ref.registry, ref.repository, DEFAULT_TAG)
        return cls(f"{ref.registry}/{ref.repository}", ref.digest or ref.tag or DEFAULT_TAG, ref)


class Step:
    """One call to the engine inside the container: `method` on `url` with an optional JSON body,
    within `timeout` seconds; with `until` (a status and JSON fields the answer must carry) it is
    repeated every `interval` seconds until the answer matches or the timeout ends."""
    __slots__ = ("body", "interval", "method", "timeout", "until", "url")

    def __init__(self, method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 60.0,
                 until: dict[str, Any] | None = None, interval: float = 0.2):
        self.method, self.url, self.body, self.timeout = method, url, body, timeout
        self.until, self.interval = until, interval

    def __repr__(self) -> str:
        return f"{self.method} {self.url}" + (f" until {self.until}" if self.until else "")

    def matches(self, status: int, body: str) -> bool:
        """Whether an answer ends this step: a 2xx (or `until`'s status) carrying `until`'s fields."""
        if not self.until:
            return 200 <= status < 300
        if status != self.until.get("status", 200):
            return False
        want = self.until.get("json") or {}
        if not want:
            return True
        try:
            got = json.loads(body)
        except ValueError:
            return False
        return isinstance(got, dict) and all(got.get(k) == v for k, v in want.items())


class EngineSteps:
    """The ordered steps thaw runs against the engine: `quiesce` before a capture, `resume` after
    a restore and on the source after a capture. `engine` names a preset (vllm, sglang), `model`
    the model path found in the engine's arguments (its weights, unless thaw.dev/weights names
    them)."""
    __slots__ = ("engine", "model", "quiesce", "resume")

    def __init__(self, quiesce: tuple[Step, ...] = (), resume: tuple[Step, ...] = (),
                 engine: str | None = None, model: str | None = None):
        self.quiesce, self.resume, self.engine, self.model = quiesce, resume, engine, model

    def __bool__(self) -> bool:
        return bool(self.quiesce or self.resume)


# The engines' own sleep/wake APIs (docs/implementation-notes.md, "Weights outside the snapshot").
# vLLM: --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1; level 2 discards the weights, so a wake is
# weights -> reload from disk -> KV cache. SGLang: --enable-memory-saver.
_PRESET_PORTS = {"vllm": 8000, "sglang": 30000}
_PRESETS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "vllm": {
        "quiesce": [{"method": "POST", "path": "/sleep?level=2", "timeout": 120},
                    {"method": "GET", "path": "/is_sleeping", "until": {"json": {"is_sleeping": True}},
                     "timeout": 30}],
        "resume": [{"method": "POST", "path": "/wake_up?tags=weights", "timeout": 60},
                   {"method": "POST", "path": "/collective_rpc", "body": {"method": "reload_weights"},
                    "timeout": 90},
                   {"method": "POST", "path": "/wake_up?tags=kv_cache", "timeout": 30},
                   {"method": "GET", "path": "/is_sleeping", "until": {"json": {"is_sleeping": False}},
                    "timeout": 30}],
    },
    "sglang": {
        "quiesce": [{"method": "POST", "path": "/release_memory_occupation",
                     "body": {"tags": ["weights", "kv_cache"]}, "timeout": 120}],
        "resume": [{"method": "POST", "path": "/resume_memory_occupation", "body": {"tags": ["weights"]},
                    "timeout": 60},
                   {"method": "POST", "path": "/update_weights_from_disk", "body": {"model_path": "{model}"},
                    "timeout": 90},
                   {"method": "POST", "path": "/resume_memory_occupation", "body": {"tags": ["kv_cache"]},
                    "timeout": 30}],
    },
}
_METHODS = ("GET", "POST", "PUT")
MAX_STEPS = 16
MAX_STEP_TIMEOUT = 600.0


def model_path(engine: str, args: list[str] | tuple[str, ...]) -> str | None:
    """The model an engine serves, from its command line: `--model X` / `--model-path X` (either
    with `=`), or vLLM's `vllm serve X`. Only an absolute path names files (a hub id does not)."""
    value = None
    flags = ("--model", "--model-path") if engine == "sglang" else ("--model",)
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg[len(flag) + 1:]
        if engine == "vllm" and arg == "serve" and value is None and i + 1 < len(args) \
                and not args[i + 1].startswith("-"):
            value = args[i + 1]
    return value if value and value.startswith("/") else None


def _step(obj: object, base: str, where: str, model: str | None) -> Step:
    if not isinstance(obj, dict):
        raise AnnotationError(f"{where}: a step must be an object")
    unknown = set(obj) - {"method", "path", "body", "timeout", "until", "interval"}
    if unknown:
        raise AnnotationError(f"{where}: unknown keys {sorted(unknown)}")
    method = obj.get("method", "POST")
    path = obj.get("path")
    if method not in _METHODS:
        raise AnnotationError(f"{where}: method must be one of {', '.join(_METHODS)}")
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n#"):
        raise AnnotationError(f"{where}: path must be an absolute URL path, got {path!r}")
    body = obj.get("body")
    if body is not None and not isinstance(body, dict):
        raise AnnotationError(f"{where}: body must be a JSON object")
    if body is not None and "{model}" in repr(body):
        if model is None:
            raise AnnotationError(f"{where}: the step sends the model path, but the engine's arguments name "
                                  "no absolute model path")
        body = {k: (model if v == "{model}" else v) for k, v in body.items()}
    timeout, interval = obj.get("timeout", 60), obj.get("interval", 0.2)
    for name, v, top in (("timeout", timeout, MAX_STEP_TIMEOUT), ("interval", interval, 60.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= top:
            raise AnnotationError(f"{where}: {name} must be a number of seconds in (0, {top:g}]")
    until = obj.get("until")
    if until is not None and (not isinstance(until, dict) or set(until) - {"status", "json"} \
                or not isinstance(until.get("status", 200), int) or not isinstance(until.get("json", {}), dict)):
        raise AnnotationError(f"{where}: until must be {{\"status\": N, \"json\": {{...}}}}")
    return Step(method, base + path, body, float(timeout), until, float(interval))


def _steps(items: object, base: str, where: str, model: str | None) -> tuple[Step, ...]:
    if items is None:
        return ()
    if not isinstance(items, list) or len(items) > MAX_STEPS:
        raise AnnotationError(f"{where} must be a list of at most {MAX_STEPS} steps")
    return tuple(_step(s, base, f"{where}[{i}]", model) for i, s in enumerate(items))


def parse_engine_steps(annotations: dict[str, str], args: list[str] | tuple[str, ...] = ()) -> EngineSteps:
    """The engine steps a container's annotations ask for: a preset (thaw.dev/engine), custom
    steps (thaw.dev/engine-steps), or the one-step URLs (thaw.dev/quiesce, thaw.dev/resume).
    `args`: the container's command line (a preset's model path)."""
    engine, custom = annotations.get(ENGINE), annotations.get(ENGINE_STEPS)
    quiesce = _url(QUIESCE, annotations.get(QUIESCE), ("http://",))
    resume = _url(RESUME, annotations.get(RESUME), ("http://",))
    if engine is None and custom is None:
        return EngineSteps(tuple([Step("POST", quiesce, timeout=120.0)] if quiesce else []),
                           tuple([Step("POST", resume, timeout=120.0)] if resume else []))
    if quiesce or resume:
        raise AnnotationError(f"{QUIESCE} / {RESUME} are the one-step form: use them or "
                              f"{ENGINE if engine is not None else ENGINE_STEPS}, not both")
    if engine is not None and custom is not None:
        raise AnnotationError(f"{ENGINE} and {ENGINE_STEPS}: name a preset or custom steps, not both")
    engine = engine.strip() if engine is not None else None
    if engine is not None and engine not in _PRESETS:
        raise AnnotationError(f"{ENGINE}: {engine!r} is not a known engine ({', '.join(sorted(_PRESETS))})")
    base = (annotations.get(ENGINE_URL) or "").strip().rstrip("/")
    if base:
        _url(ENGINE_URL, base, ("http://",))
        if not re.fullmatch(r"http://[A-Za-z0-9.\[\]:-]+", base):
            raise AnnotationError(f"{ENGINE_URL}: {base!r} must be http://HOST[:PORT], without a path")
    model = model_path(engine or "", args) if engine else None
    if engine is not None:
        spec = _PRESETS[engine]
        base = base or f"http://127.0.0.1:{_PRESET_PORTS[engine]}"
    else:
        try:
            spec = json.loads(custom or "")
        except ValueError as exc:
            raise AnnotationError(f"{ENGINE_STEPS}: not JSON: {exc}") from None
        if not isinstance(spec, dict) or set(spec) - {"url", "quiesce", "resume"}:
            raise AnnotationError(f"{ENGINE_STEPS}: want {{\"url\": ..., \"quiesce\": [...], \"resume\": [...]}}")
        url = spec.get("url", base)
        if not isinstance(url, str) or not url:
            raise AnnotationError(f"{ENGINE_STEPS}: needs \"url\" (or {ENGINE_URL}): where the engine listens")
        base = _url(ENGINE_STEPS + " url", url, ("http://",)) or ""
        base = base.rstrip("/")
    return EngineSteps(_steps(spec.get("quiesce"), base, f"{ENGINE_STEPS if custom else engine} quiesce", model),
                       _steps(spec.get("resume"), base, f"{ENGINE_STEPS if custom else engine} resume", model),
                       engine, model)


def weight_paths(annotations: dict[str, str], steps: EngineSteps | None = None) -> tuple[str, ...]:
    """The weight files or directories a container names (paths inside it): thaw.dev/weights, else
    the preset engine's model path."""
    raw = annotations.get(WEIGHTS)
    if raw is None:
        return (steps.model,) if steps is not None and steps.model else ()
    paths = tuple(p.strip() for p in raw.split(",") if p.strip())
    for p in paths:
        if not p.startswith("/") or "\0" in p or len(p) > 4096:
            raise AnnotationError(f"{WEIGHTS}: {p!r} must be an absolute path inside the container")
    if not paths or len(paths) > 256:
        raise AnnotationError(f"{WEIGHTS}: name 1 to 256 paths")
    return paths


class ThawRequest:
    """What a container's annotations ask of thaw."""

    def __init__(self, snapshot: SnapshotRef, required: bool = False, capture_on_ready: bool = False,
                 ready: str | None = None, quiesce: str | None = None, resume: str | None = None,
                 pull_wait: bool = False, push: bool = False, steps: EngineSteps | None = None):
        self.snapshot, self.required, self.capture_on_ready = snapshot, required, capture_on_ready
        self.ready, self.quiesce, self.resume = ready, quiesce, resume
        self.pull_wait, self.push = pull_wait, push
        self.steps = steps if steps is not None else EngineSteps(
            (Step("POST", quiesce, timeout=120.0),) if quiesce else (),
            (Step("POST", resume, timeout=120.0),) if resume else ())


def valid_namespace(ns: str) -> bool:
    """A Kubernetes namespace (a DNS label) or LOCAL_NAMESPACE."""
    if ns == LOCAL_NAMESPACE:
        return True
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


def parse_request(annotations: dict[str, str], args: list[str] | tuple[str, ...] = ()) -> ThawRequest:
    """Parse thaw's annotations; raise AnnotationError naming the bad one. `args`: the
    container's command line (where a preset finds the model path)."""
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
        steps=parse_engine_steps(annotations, args),
    )

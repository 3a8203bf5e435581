"""One `create` of a container that asks thaw for a snapshot, as every step of it sees it: built
once per call from what thaw-runtime was handed and passed down (create, restore's check and
bring-up, the cold start's record). Its annotations are parsed once, its state files named once,
the host's mount table read once (when a step first needs it); no step rebuilds them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from thaw.oci import annotations as ann
from thaw.oci.runc_args import RuncCall
from thaw.oci.spec import Bundle

from ..drivers.mounts import MountTable
from ..node.config import Config
from ..node.state import ContainerState


@dataclass
class Container:
    call: RuncCall
    bundle: Bundle
    cfg: Config
    next_runtime: str
    state: ContainerState
    # parsed once; an AnnotationError stands in for what could not be (a cold start's reason)
    _request: ann.ThawRequest | ann.AnnotationError
    _namespace: str | ann.AnnotationError

    @classmethod
    def of(cls, call: RuncCall, bundle: Bundle, cfg: Config, next_runtime: str) -> Container:
        """Raises ValueError for a container id that cannot name thaw's state files."""
        state = ContainerState(cfg.state_dir, call.container_id or "")
        request: ann.ThawRequest | ann.AnnotationError
        namespace: str | ann.AnnotationError
        try:
            request = ann.parse_request(bundle.annotations, (bundle.spec.get("process") or {}).get("args") or [])
        except ann.AnnotationError as exc:
            request = exc
        try:
            namespace = ann.namespace_of(bundle.annotations)
        except ann.AnnotationError as exc:
            namespace = exc
        return cls(call, bundle, cfg, next_runtime, state, request, namespace)

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def request(self) -> ann.ThawRequest:
        """What the annotations ask; raises the AnnotationError that names a bad one."""
        if isinstance(self._request, ann.AnnotationError):
            raise self._request
        return self._request

    @property
    def namespace(self) -> str:
        """The namespace the container belongs to (its pod's); raises AnnotationError."""
        if isinstance(self._namespace, ann.AnnotationError):
            raise self._namespace
        return self._namespace

    @functools.cached_property
    def mounts(self) -> MountTable:
        """The host's mount table as the create found it (its rootfs, cgroup hierarchies)."""
        return MountTable.read()

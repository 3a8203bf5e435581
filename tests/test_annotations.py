import pytest

from thaw.oci import annotations as ann
from thaw.oci.annotations import AnnotationError, SnapshotRef


def test_ref_parsing():
    assert SnapshotRef.parse("qwen") == SnapshotRef("qwen", "latest")
    assert str(SnapshotRef.parse("qwen-0.6b:v2")) == "qwen-0.6b:v2"


@pytest.mark.parametrize("bad", ["", "UPPER", "../etc", "a/b", "a:b:c", "a:", ":t", "a b", "x" * 200,
                                 "..hidden", "a:../x"])
def test_bad_refs(bad):
    with pytest.raises(AnnotationError):
        SnapshotRef.parse(bad)


def test_request_fields():
    req = ann.parse_request({ann.SNAPSHOT: "s:1", ann.REQUIRED: "true", ann.CAPTURE: "on-ready",
                             ann.READY: "http://127.0.0.1:8000/health",
                             ann.QUIESCE: "http://127.0.0.1:8000/quiesce"})
    assert req.required and req.capture_on_ready and req.snapshot == SnapshotRef("s", "1")
    assert req.quiesce is not None and req.quiesce.endswith("/quiesce") and req.resume is None


@pytest.mark.parametrize("annotations", [
    {ann.SNAPSHOT: "s", ann.REQUIRED: "yes"},
    {ann.SNAPSHOT: "s", ann.CAPTURE: "always", ann.READY: "file:/x"},
    {ann.SNAPSHOT: "s", ann.CAPTURE: "on-ready"},
    {ann.SNAPSHOT: "s", ann.READY: "ftp://x"},
    {ann.SNAPSHOT: "Bad Name"},
])
def test_malformed_requests(annotations):
    with pytest.raises(AnnotationError):
        ann.parse_request(annotations)


def test_sandbox_and_wants():
    assert ann.wants_thaw({ann.SNAPSHOT: "x"})
    assert not ann.wants_thaw({ann.SNAPSHOT: "x", ann.CRI_CONTAINER_TYPE: "sandbox"})
    assert not ann.wants_thaw({})
    assert ann.is_required({ann.REQUIRED: " TRUE "})

"""The shape the code promises: the passthrough fence (what a passthrough decision imports) and
the container phases' guarded transitions."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

import thaw.oci
from thaw.shim.node.state import ContainerState, Phase, PhaseError, Record, advance

SITE = os.path.dirname(os.path.dirname(os.path.dirname(thaw.oci.__file__)))

# What thaw-runtime may have loaded when it decides to pass a call through: its own top-level
# imports and the record lookup of start/delete. Anything more is paid by every container.
ALLOWED_THAW = {"thaw", "thaw.oci", "thaw.oci.runc_args", "thaw.shim", "thaw.shim.entry",
                "thaw.shim.entry.runtime", "thaw.shim.node", "thaw.shim.node.config",
                "thaw.shim.node.config_schema", "thaw.shim.node.state_path"}
NEVER = ["json", "re", "enum", "subprocess", "yaml", "typing", "dataclasses", "signal"]

_PROBE = r"""
import sys
sys.path[:0] = [SITE]
before = set(sys.modules)
from thaw.shim.entry import runtime
class Passed(BaseException):
    pass
def passthrough(binary, argv):
    raise Passed()
runtime.passthrough = passthrough
try:
    runtime.main(ARGV)
    outcome = "returned"
except Passed:
    outcome = "passthrough"
except SystemExit as e:
    outcome = f"exit {e.code}"
loaded = sorted(m for m in set(sys.modules) - before)
sys.stdout.write(repr((outcome, loaded)))
"""


def _decide(argv: list[str], env: dict) -> tuple[str, list[str]]:
    code = _PROBE.replace("SITE", repr(SITE)).replace("ARGV", repr(["thaw-runtime", *argv]))
    # -I -S, as the installed launcher runs it: no site, no user paths.
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    outcome, loaded = eval(out.stdout)  # our own probe's repr of (str, list[str])
    return outcome, loaded


@pytest.fixture
def node(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    conf = tmp_path / "config.yaml"
    runc = shutil.which("runc") or "/usr/sbin/runc"
    conf.write_text(f"state_dir: {state_dir}\nstore_dir: {tmp_path / 'store'}\nnext_runtime: {runc}\n")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "process": {"args": ["sh"]},
                                                    "annotations": {"io.kubernetes.cri.container-type": "container"}}))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "THAW_CONFIG": str(conf)}
    _decide(["--version"], env)      # the first call parses the YAML and caches it, as on a node once
    return env, str(bundle), state_dir


@pytest.mark.parametrize("argv", [
    ["create", "--bundle", "{bundle}", "c1"],
    ["start", "c1"],
    ["delete", "--force", "c1"],
    ["kill", "c1", "9"],
    ["state", "c1"],
    ["--version"],
])
def test_passthrough_decision_imports_almost_nothing(node, argv):
    """The fence around the hot path, checked on sys.modules rather than trusted to a comment."""
    env, bundle, _ = node
    outcome, loaded = _decide([a.replace("{bundle}", bundle) for a in argv], env)
    assert outcome == "passthrough"
    thaw_loaded = {m for m in loaded if m.startswith("thaw")}
    assert thaw_loaded <= ALLOWED_THAW, sorted(thaw_loaded - ALLOWED_THAW)
    assert not [m for m in NEVER if m in loaded]


@pytest.mark.runc
def test_a_thaw_container_leaves_the_fence(node):
    """The probe sees imports: a create that asks for a snapshot loads the restore machinery."""
    env, bundle, _ = node
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    spec["annotations"]["thaw.dev/snapshot"] = "absent:v1"
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    outcome, loaded = _decide(["--root", os.path.join(bundle, "runc-root"), "create", "--bundle", bundle, "c1"], env)
    assert "thaw.shim.lifecycle.create" in loaded and "json" in loaded, (outcome, loaded)


# What a thaw container's create and its inline hooks import: the measured lazy imports stay lazy.
LAZY_ON_CREATE = ["thaw.shim.drivers.cuda", "thaw.shim.drivers.engine", "thaw.shim.lifecycle.weights",
                  "thaw.shim.drivers.criu_decode", "urllib.request", "psutil", "google.protobuf"]
LAZY_IN_HOOKS = ["thaw.shim.lifecycle.autocapture", "thaw.shim.lifecycle.prefetch", "thaw.shim.drivers.engine",
                 "thaw.shim.node.store", "urllib.request", "psutil"]


@pytest.mark.parametrize(("module", "lazy"), [("thaw.shim.lifecycle.create", LAZY_ON_CREATE),
                                              ("thaw.hooks.main", LAZY_IN_HOOKS),
                                              ("thaw.hooks.stages", LAZY_IN_HOOKS)])
def test_the_create_path_and_the_hooks_import_no_more_than_they_use(module, lazy):
    """A create's restore machinery is loaded, but not what only a GPU, a resume step, weights or
    a joined UTS namespace needs; thaw-hook (inline in a container's create and delete) loads
    what its stage uses, in the stage."""
    code = f"import sys; sys.path[:0] = [{SITE!r}]; import {module}; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = set(eval(out.stdout))
    assert not [m for m in lazy if m in loaded], sorted(m for m in lazy if m in loaded)


# --- phases ------------------------------------------------------------------------------------
LEGAL = {(None, Phase.RESTORING), (None, Phase.COLD), (Phase.RESTORING, Phase.RESTORED),
         (Phase.RESTORED, Phase.RUNNING)}


def test_the_transition_table_is_exactly_the_legal_one():
    for current in (None, *Phase):
        for to in Phase:
            if (current, to) in LEGAL:
                assert advance(current, to) is to
            else:
                with pytest.raises(PhaseError):
                    advance(current, to)


def _record(st: ContainerState) -> Record:
    record = st.read()
    assert record is not None, "no state record"
    return record


def test_transitions_through_the_state_files(tmp_path):
    st = ContainerState(str(tmp_path), "c1")
    record = st.begin_restore("snap:v1", 1.0, "/b", None, False, "/u")
    assert _record(st).phase is Phase.RESTORING
    with pytest.raises(TypeError):
        st.update(phase=Phase.RUNNING)              # phases move only by transition
    assert st.started() is False                    # not restored yet: start is not a no-op
    st.restored(record, pid=42)
    assert _record(st).phase is Phase.RESTORED and _record(st).owner is None
    with pytest.raises(PhaseError):
        st.restored(_record(st))                      # restored twice: a bug
    assert st.started() is True and _record(st).phase is Phase.RUNNING
    assert st.started() is False


def test_a_cold_record_never_becomes_restored(tmp_path):
    st = ContainerState(str(tmp_path), "c2")
    st.cold(1.0, None, "why", None, None)
    with pytest.raises(PhaseError):
        st.restored(_record(st))
    assert _record(st).phase is Phase.COLD


def test_a_record_with_an_unknown_phase_is_not_read(tmp_path):
    st = ContainerState(str(tmp_path), "c3")
    st.cold(1.0, None, "why", None, None)
    with open(st.path) as f:
        raw = json.load(f)
    raw["phase"] = "resurrected"
    with open(st.path, "w") as f:
        json.dump(raw, f)
    assert st.read() is None
    assert Record.from_json({**raw, "phase": "cold"}).phase is Phase.COLD


# --- one Container per call ----------------------------------------------------------------------
def test_a_create_parses_names_and_reads_once(tmp_path, monkeypatch):
    """The annotations parsed, the state files named and the mount table read once per create
    (Container.of and its first use), however far the decision goes: here through the whole check
    (an image that differs) to a cold start's record."""
    from helpers import fake_snapshot
    from thaw.oci import annotations as ann
    from thaw.oci import runc_args
    from thaw.oci.spec import Bundle
    from thaw.shim.drivers.mounts import MountTable
    from thaw.shim.lifecycle import create
    from thaw.shim.lifecycle.container import Container
    from thaw.shim.node.config import Config
    from thaw.shim.node.store import Store

    cfg = Config(store_dir=str(tmp_path / "store"), state_dir=str(tmp_path / "state"), hook="",
                 metrics_dir=str(tmp_path / "metrics"))
    fake_snapshot(Store(cfg.store_dir).init(), "app:1")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({
        "ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["sh"]},
        "annotations": {"thaw.dev/snapshot": "app:1", "io.kubernetes.cri.image-name": "other:2"}}))
    b = Bundle.load(str(tmp_path / "b"))
    call = runc_args.parse(["thaw-runtime", "create", "--bundle", b.path, "c1"])
    c = Container.of(call, b, cfg, "/usr/bin/false")

    counts = {"parse_request": 0, "namespace_of": 0, "ContainerState": 0, "MountTable.read": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapper
    monkeypatch.setattr(ann, "parse_request", counted("parse_request", ann.parse_request))
    monkeypatch.setattr(ann, "namespace_of", counted("namespace_of", ann.namespace_of))
    monkeypatch.setattr(ContainerState, "__init__", counted("ContainerState", ContainerState.__init__))
    monkeypatch.setattr(MountTable, "read", classmethod(counted("MountTable.read", MountTable.__dict__["read"].__func__)))
    outcome = create.create(c)
    assert isinstance(outcome, create.ColdStart) and outcome.code == "incompatible", outcome
    assert counts == {"parse_request": 0, "namespace_of": 0, "ContainerState": 0, "MountTable.read": 1}


def _thaw_modules() -> list[str]:
    import pkgutil

    import thaw.hooks
    import thaw.shim
    names = []
    for pkg in (thaw.oci, thaw.shim, thaw.hooks):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


def test_every_error_is_a_thaw_error_and_no_name_is_shared_or_builtin():
    """One error base (ThawError), no class named like a builtin, no two classes of one name."""
    import builtins
    import importlib
    import inspect
    errors: list[str] = []
    seen: dict[str, str] = {}
    for name in _thaw_modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name:
                continue
            if issubclass(cls, BaseException) and not issubclass(cls, thaw.oci.ThawError):
                errors.append(f"{name}.{cls_name} does not derive from ThawError")
            if hasattr(builtins, cls_name):
                errors.append(f"{name}.{cls_name} shadows a builtin")
            if cls_name in seen:
                errors.append(f"{name}.{cls_name} shares its name with {seen[cls_name]}.{cls_name}")
            seen[cls_name] = name
    assert not errors, "\n".join(errors)


def test_no_product_module_names_a_test_variable():
    """Test-only plumbing stays in shim/faults.py: no other module of thaw reads or forwards a
    THAW_TEST_* variable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(thaw.oci.__file__)))
    found = []
    for folder in ("oci", "shim", "hooks"):
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            for n in names:
                path = os.path.join(dirpath, n)
                if n.endswith(".py") and path != os.path.join(root, "shim", "faults.py"):
                    with open(path) as f:
                        if "THAW_TEST_" in f.read():
                            found.append(os.path.relpath(path, root))
    assert not found, found


# No module of thaw's source over this many lines (issue 18: each readable in one sitting).
MAX_MODULE_LINES = 500
# Modules allowed over it, each with why. An entry whose module is no longer over fails too: remove it.
LONG_MODULES: dict[str, str] = {}


def test_no_module_is_over_500_lines():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sizes = {}
    for top in ("oci", "shim", "hooks"):
        for dirpath, dirnames, files in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in files:
                if name.endswith(".py") and not name.endswith("_pb2.py"):   # _pb2: protoc's, made at install
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        sizes[os.path.relpath(path, root)] = f.read().count("\n")   # as wc -l counts
    assert len(sizes) > 50, sorted(sizes)   # the walk found the source
    over = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES and p not in LONG_MODULES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by what they own): {over}"
    needless = [p for p in LONG_MODULES if sizes.get(p, 0) <= MAX_MODULE_LINES]
    assert not needless, f"no longer over {MAX_MODULE_LINES} lines, remove from LONG_MODULES: {needless}"


# --- one way to do each thing: one timer, one digest helper, one atomic write --------------------
def _sources() -> list[tuple[str, ast.AST]]:
    """(path under the package, syntax tree) of every module of thaw: oci/, shim/, hooks/."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(thaw.oci.__file__)))
    out: list[tuple[str, ast.AST]] = []
    for folder in ("oci", "shim", "hooks"):
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            for n in sorted(names):
                if n.endswith(".py"):
                    path = os.path.join(dirpath, n)
                    with open(path) as f:
                        out.append((os.path.relpath(path, root), ast.parse(f.read(), path)))
    return out


def _uses(tree: ast.AST, module: str, names: set[str]) -> list[ast.expr | ast.stmt]:
    """Where `module.NAME` is referred to (or NAME imported from it), NAME in `names`."""
    found: list[ast.expr | ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in names and isinstance(node.value, ast.Name) and node.value.id == module:
                found.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == module and any(a.name in names for a in node.names):
            found.append(node)
    return found


def test_durations_are_measured_by_the_one_timer():
    """shim/timing.py (PhaseTimer, Stopwatch) reads time.perf_counter; nobody else does. And
    time.monotonic elsewhere makes deadlines and throttles (`monotonic() + limit`, compared with
    one), never a duration: it is never the left side of a subtraction, nor handed on uncalled
    (a start time kept for later). A duration kept in a variable (`now - self._last`) is not
    caught: throttles do that, and telling the two apart needs more than syntax."""
    found = []
    for path, tree in _sources():
        if path != "shim/timing.py":
            found += [f"{path}:{n.lineno}: perf_counter" for n in _uses(tree, "time", {"perf_counter"})]
        calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        left_of_minus = {id(n.left) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "time" and \
                    any(a.name == "monotonic" for a in node.names):
                found.append(f"{path}:{node.lineno}: monotonic imported bare")
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if _uses(call.func, "time", {"monotonic"}) and id(call) in left_of_minus:
                found.append(f"{path}:{call.lineno}: monotonic() - start (a duration: use shim/timing)")
        for node in _uses(tree, "time", {"monotonic"}):
            if id(node) not in calls:
                found.append(f"{path}:{node.lineno}: time.monotonic kept uncalled (a start time)")
    assert not found, "\n".join(found)


# A module that needs hashlib for something the digest owner does not do says why here.
HASHLIB_ALLOWED: dict[str, str] = {}


def test_one_module_hashes():
    """oci/digest.py owns sha256 (of bytes, a file, a stream; OCI digest form or plain hex);
    no other module imports hashlib."""
    found = []
    for path, tree in _sources():
        if path == "oci/digest.py" or path in HASHLIB_ALLOWED:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Import) and any(a.name == "hashlib" for a in node.names)) or \
                    (isinstance(node, ast.ImportFrom) and node.module == "hashlib"):
                found.append(f"{path}:{node.lineno}")
    assert not found, found


# Renames that are no file write (a file made by tmp + rename goes through oci/files.AtomicFile):
RENAMES_ALLOWED = {
    "oci/files.py": 1,              # AtomicFile itself
    "oci/layout.py": 1,             # a blob's commit: named by its digest, known once written
    "shim/node/store/images.py": 2,  # verified files moved into an image dir; a staged dir placed
    "shim/node/events.py": 1,       # the events log's rotation
}


def test_renames_only_where_they_are_no_file_write():
    found = {}
    for path, tree in _sources():
        n = len(_uses(tree, "os", {"replace", "rename", "renames"}))
        if n:
            found[path] = n
    assert found == RENAMES_ALLOWED


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    """AtomicFile (and atomic_write, its whole-bytes form): the new content on a clean exit, with
    the mode asked for; on an exception the old content and no temporary file left."""
    from thaw.oci.files import AtomicFile, atomic_write
    path = str(tmp_path / "f")
    atomic_write(path, b"old", mode=0o640)
    assert open(path, "rb").read() == b"old" and os.stat(path).st_mode & 0o777 == 0o640
    with pytest.raises(RuntimeError), AtomicFile(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("the writer failed")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f"]
    with AtomicFile(path, 0o600, durable=False) as f:
        f.write(b"new ")
        f.write(b"content")
    assert open(path, "rb").read() == b"new content" and os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["f"]

"""install/containerd.sh, shim/containerd/ and the Kubernetes manifests in install/k8s.

Most tests run install/containerd.sh against temporary directories (CONTAINERD_CONFIG,
CONTAINERD_CONF_D) with a fake `containerd` that answers `--version`, `config default` and
`config dump`, and restart disabled; they need no root. The tests marked `containerd` run the
real containerds of tests/cri/builds.py (Debian 12's 1.6, trixie's 1.7, sid's 2.x) on the result.
"""

from __future__ import annotations

import glob
import importlib
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import yaml

from thaw.oci import annotations as ann
from thaw.shim.containerd import ContainerdConfigError, checks, discovery, dropin, goglob, install, merge
from thaw.shim.containerd.merge import CRI_V2, CRI_V3
from thaw.shim.node import config

_PKG = "tests.cri" if __name__.startswith("tests.") else "cri"
builds = importlib.import_module(f"{_PKG}.builds")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "install", "containerd.sh")
K8S = os.path.join(REPO, "install", "k8s")
STRICT = os.environ.get("THAW_TEST_STRICT") == "1"

V16 = "containerd github.com/containerd/containerd v1.6.20 2806fc1057397dbaeefbea0e4e17bddfbd388f38"
V16_DEBIAN = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
V21 = "containerd github.com/containerd/containerd/v2 v2.1.0 061792f0ecf3684fb30a3a0eb006799b8c6638a7"
V21_DEBIAN = "containerd github.com/containerd/containerd/v2 2.1.9+unknown "

# What `containerd config default` gives for the runtimes, trimmed.
DEFAULT_V2 = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      BinaryName = ""
      SystemdCgroup = false
"""
DEFAULT_V3 = """version = 3
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    sandboxer = "podsandbox"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = ""
      SystemdCgroup = false
"""

# A user's config.toml as kubeadm guides have it: comments, systemd cgroups, a pause image.
USER_V2 = """# my containerd config
version = 2   # keep
root = "/var/lib/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["https://mirror.example:5000"]
  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"
"""

USER_V3 = """version = 3

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = true
"""


# ------------------------------------------------------------------------------------- fixtures

class Node:
    """A fake node: main config, drop-in dir, fake containerd, thaw-runtime, all under tmp."""

    def __init__(self, tmp_path, version: str = V16, default: str = DEFAULT_V2, dump_fails: bool = False):
        self.dir = tmp_path
        self.etc = tmp_path / "etc" / "containerd"
        self.config = self.etc / "config.toml"
        self.conf_d = self.etc / "conf.d"
        self.drop_in = self.conf_d / "99-thaw.toml"
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        (tmp_path / "default.toml").write_text(default)
        fake = self.bin / "containerd"
        fake.write_text(
            "#!/bin/sh\n"
            f"case \"$*\" in\n"
            f"  --version) echo '{version}' ;;\n"
            f"  'config default') cat '{tmp_path / 'default.toml'}' ;;\n"
            f"  *'config dump') {'echo boom >&2; exit 1' if dump_fails else 'exit 0'} ;;\n"
            "  *) echo \"fake containerd: $*\" >&2; exit 2 ;;\n"
            "esac\n")
        fake.chmod(0o755)
        self.containerd = str(fake)
        self.runtime = tmp_path / "thaw-runtime"
        self.runtime.write_text("#!/bin/sh\nexec runc \"$@\"\n")
        self.runtime.chmod(0o755)

    def env(self, **extra) -> dict:
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}",
               "CONTAINERD_CONFIG": str(self.config), "CONTAINERD_CONF_D": str(self.conf_d),
               "THAW_RUNTIME_BIN": str(self.runtime), "THAW_CONTAINERD_RESTART": "0",
               "THAW_PYTHON": sys.executable}
        env.pop("CONTAINERD_BIN", None)
        env.update(extra)
        return env

    def run(self, check: bool = True, **extra) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=self.env(**extra), timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"containerd.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def write_config(self, text: str) -> bytes:
        self.etc.mkdir(parents=True, exist_ok=True)
        self.config.write_text(text)
        return self.config.read_bytes()

    def drop(self) -> dict:
        return tomllib.loads(self.drop_in.read_text())

    def main(self) -> dict:
        return tomllib.loads(self.config.read_text())

    @property
    def entry(self) -> str:
        return f"{self.conf_d}/*.toml"

    def backups(self) -> list[str]:
        return sorted(glob.glob(str(self.config) + ".thaw-backup-*"))


def thaw_entry(cfg: dict, plugin: str) -> dict:
    return cfg["plugins"][plugin]["containerd"]["runtimes"]["thaw"]


def assert_thaw_entry(entry: dict, binary: str) -> None:
    assert entry["runtime_type"] == "io.containerd.runc.v2"
    assert entry["options"]["BinaryName"] == binary
    assert "thaw.dev/*" in entry["pod_annotations"]
    assert "thaw.dev/*" in entry["container_annotations"]


# ------------------------------------------------------------------------------------ manifests

def _docs(name: str) -> list[dict]:
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_every_manifest_loads_with_known_kinds():
    want = {("node.k8s.io/v1", "RuntimeClass"), ("v1", "Pod"), ("v1", "Namespace"),
            ("v1", "ServiceAccount"), ("apps/v1", "DaemonSet"), ("v1", "ConfigMap")}
    seen = set()
    files = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
    assert {os.path.basename(f) for f in files} >= {"runtimeclass.yaml", "example-pod.yaml", "daemonset.yaml"}
    for path in files:
        for doc in _docs(os.path.basename(path)):
            key = (doc["apiVersion"], doc["kind"])
            assert key in want, f"{path}: unexpected {key}"
            assert doc["metadata"]["name"]
            seen.add(key)
    assert seen == want


def test_runtimeclass():
    [rc] = _docs("runtimeclass.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("node.k8s.io/v1", "RuntimeClass")
    assert rc["metadata"]["name"] == "thaw"
    assert rc["handler"] == dropin.HANDLER == "thaw"
    assert rc["scheduling"]["nodeSelector"] == {"thaw.dev/enabled": "true"}


def test_example_pod_uses_the_runtime_class_and_valid_annotations():
    [rc] = _docs("runtimeclass.yaml")
    [pod] = _docs("example-pod.yaml")
    assert pod["kind"] == "Pod" and pod["spec"]["runtimeClassName"] == rc["metadata"]["name"]
    annotations = pod["metadata"]["annotations"]
    assert all(isinstance(v, str) for v in annotations.values())
    req = ann.parse_request(annotations)
    assert req.capture_on_ready and str(req.snapshot) == "qwen3-0.6b-example:v1"
    assert req.ready == "http://127.0.0.1:8000/health"
    assert req.quiesce == "http://127.0.0.1:8000/quiesce" and req.resume == "http://127.0.0.1:8000/resume"
    # the URLs point at the example server's port
    [c] = pod["spec"]["containers"]
    assert [p["containerPort"] for p in c["ports"]] == [8000]
    assert "/app/server.py" in c["command"] and "8000" in c["command"]
    # every annotation the pod sets passes the handler's allow-list
    assert not dropin.uncovered(dropin.ANNOTATIONS, keys=tuple(annotations))


def test_daemonset_installs_thaw_on_the_node(tmp_path):
    docs = _docs("daemonset.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    ns = by_kind["Namespace"]["metadata"]["name"]
    assert ns == "thaw-system"
    sa, ds, cm = by_kind["ServiceAccount"], by_kind["DaemonSet"], by_kind["ConfigMap"]
    assert sa["metadata"]["namespace"] == ns and ds["metadata"]["namespace"] == ns == cm["metadata"]["namespace"]
    assert ds["apiVersion"] == "apps/v1"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    spec = ds["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert spec["hostPID"] is True
    assert spec["nodeSelector"] == {"thaw.dev/enabled": "true"}
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])
    [init] = spec["initContainers"]
    assert init["securityContext"]["privileged"] is True
    # the installer image's entrypoint (install/image/entrypoint.sh) installs into the node at /host
    assert init["command"] == ["/usr/local/bin/thaw-installer", "install"]
    entrypoint = open(os.path.join(REPO, "install", "image", "entrypoint.sh")).read()
    assert 'thaw-node.sh" copy --root "$HOST"' in entrypoint and '$ENTER "$B/share/thaw-node.sh" install' in entrypoint
    assert "nsenter --target 1 --mount --uts --ipc --net --pid --" in entrypoint
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert mounts["host-root"] == "/host" and vols["host-root"]["hostPath"]["path"] == "/"
    # config.yaml through the ConfigMap, registry credentials through a Secret, both optional
    assert mounts["config"] == "/etc/thaw-config" and vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert vols["config"]["configMap"]["optional"] and vols["registry"]["secret"]["optional"]
    assert mounts["registry"] == "/etc/thaw-registry" and "/etc/thaw-registry" in entrypoint
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    path = os.path.join(str(tmp_path), "config.yaml")
    with open(path, "w") as f:
        f.write(cm["data"]["config.yaml"])
    assert config.load(path).criu == "/opt/thaw/current/sbin/criu"     # a valid config
    assert cfg["registry"]["auth_file"] == "/etc/thaw/auth.json"
    [main] = spec["containers"]
    assert main["command"] == ["/usr/local/bin/thaw-installer", "sleep"]
    assert "thaw-installer:" in init["image"] and main["image"] == init["image"]


# ------------------------------------------------------------------------------ pure functions

@pytest.mark.parametrize("text,want", [(V16, (1, 6, 20)), (V16_DEBIAN, (1, 6, 20)), (V21, (2, 1, 0)),
                                       (V21_DEBIAN, (2, 1, 9)),
                                       ("containerd github.com/containerd/containerd v1.7.13 64b8a81", (1, 7, 13)),
                                       ("nonsense", None)])
def test_parse_version(text, want):
    assert discovery.parse_version(text) == want


def test_allow_list_matching_is_go_filepath_match():
    keys = list(dropin.ANNOTATION_KEYS)
    assert dropin.uncovered(["thaw.dev/*"]) == []
    assert dropin.uncovered(["*"]) == keys                      # `*` does not cross `/`
    assert dropin.uncovered(["thaw.dev/snap*"]) == [k for k in keys if k != "thaw.dev/snapshot"]
    assert dropin.uncovered(["thaw.dev/[a-z]*"]) == []
    assert dropin.uncovered(["thaw.dev/[a-z"]) == keys          # malformed: matches nothing
    assert dropin.uncovered([]) == keys


@pytest.mark.parametrize("pattern,name,want", [
    ("*", "abc", True), ("*", "a/b", False), ("a*/b", "abc/b", True), ("a*b*c", "axxbyyc", True),
    ("a*b", "a/b", False), ("?", "a", True), ("?", "/", False), ("a?c", "abc", True), ("", "", True),
    ("ab", "abc", False), ("[abc]", "b", True), ("[^abc]", "d", True), ("[^abc]", "b", False),
    ("[!abc]", "!", True),                        # `!` is no negation in Go
    ("[a-c]x", "bx", True), ("[c-a]", "b", False), ("[^a]", "/", True),   # a class may match `/`
    (r"a\*b", "a*b", True), (r"a\*b", "axb", False), (r"[\]]", "]", True), (r"[\-]", "-", True),
    ("[", "[", False), ("[]", "]", False), ("[a", "a", False), ("a\\", "a", False),   # malformed
    ("[-a]", "-", False), ("[a-]", "a", False), ("*.toml", ".hidden.toml", True),
])
def test_go_match(pattern, name, want):
    assert goglob.match(pattern, name) is want


def test_go_glob_sorts_and_does_not_hide_dot_files(tmp_path):
    for name in ("b.toml", ".a.toml", "a.toml", "c.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "d.toml").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.toml").write_text("")
    assert goglob.glob(f"{tmp_path}/*.toml") == [f"{tmp_path}/{n}" for n in (".a.toml", "a.toml", "b.toml", "d.toml")]
    assert goglob.glob(f"{tmp_path}/s*/*.toml") == [f"{tmp_path}/sub/x.toml"]
    assert goglob.glob(f"{tmp_path}/a.toml") == [f"{tmp_path}/a.toml"]
    assert goglob.glob(f"{tmp_path}/missing") == [] and goglob.glob(f"{tmp_path}/[") == []


def test_add_import_inserts_one_line_or_extends_the_array():
    text = '# c\nversion = 2 # v\n\n[plugins]\n  x = 1\n'
    new = install.add_import(text, "/d/99-thaw.toml")
    assert new == '# c\nversion = 2 # v\nimports = ["/d/99-thaw.toml"]\n\n[plugins]\n  x = 1\n'
    text = 'version = 2\nimports = [\n  "/a/*.toml", # mine\n  # more\n]\n[x]\ny = "]"\n'
    new = install.add_import(text, "/d/99-thaw.toml")
    assert new == 'version = 2\nimports = [\n  "/a/*.toml", # mine\n  # more\n  "/d/99-thaw.toml"\n]\n[x]\ny = "]"\n'
    assert install.add_import('version = 2\nimports = []\n', "/d") == 'version = 2\nimports = ["/d"]\n'
    assert install.add_import('version = 2\nimports = ["/a", ] # c\n', "/d") == 'version = 2\nimports = ["/a", "/d" ] # c\n'
    assert install.add_import("imports = ['/x']\nversion = 2", "/d") == "imports = ['/x', \"/d\"]\nversion = 2"
    # the line ending is the file's, and no blank line appears before the first table
    assert install.add_import('version = 2\r\n[a]\r\n', "/d") == 'version = 2\r\nimports = ["/d"]\r\n[a]\r\n'
    # a new line goes after the last top-level key; a missing final newline is added there
    assert install.add_import('version = 2\nroot = "/r"\n[a]\n', "/d") == 'version = 2\nroot = "/r"\nimports = ["/d"]\n[a]\n'
    assert install.add_import('version = 2', "/d") == 'version = 2\nimports = ["/d"]\n'
    # imports in a table is not the top-level key: a new top-level line is added
    text = 'version = 2\n[x]\nimports = ["/no"]\n'
    assert install.add_import(text, "/d") == 'version = 2\nimports = ["/d"]\n[x]\nimports = ["/no"]\n'
    with pytest.raises(ContainerdConfigError):
        install.add_import('version = 2\nimports = "/a"\n', "/d")       # not an array


def _uninstall(node: Node) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thaw.shim.containerd", "uninstall", "--config", str(node.config),
                           "--conf-d", str(node.conf_d)], capture_output=True, text=True, timeout=60)


def test_uninstall_removes_the_drop_in_and_only_the_imports_entry_thaw_added(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2)
    node.run()
    assert node.drop_in.exists() and node.entry in node.main()["imports"]
    # the user edits the main config after the install: a comment, another import, a setting
    edited = node.config.read_text().replace("imports = [", "# mine\nimports = [\"/etc/extra.toml\", ")
    edited += '\n[debug]\n  level = "debug"\n'
    node.config.write_text(edited)
    proc = _uninstall(node)
    assert proc.returncode == 100, proc.stdout + proc.stderr
    assert not node.drop_in.exists() and not (node.conf_d / install.RECORD_NAME).exists()
    text = node.config.read_text()
    assert node.main()["imports"] == ["/etc/extra.toml"] and "# mine" in text and 'level = "debug"' in text
    assert tomllib.loads(text) == {k: v for k, v in tomllib.loads(edited).items() if k != "imports"} | {
        "imports": ["/etc/extra.toml"]}
    assert _uninstall(node).returncode == 0       # nothing left to do


def test_uninstall_leaves_an_entry_the_user_had_or_that_other_files_need(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2.replace("version = 2", f"version = 2\nimports = [\"{tmp_path}/etc/containerd/conf.d/*.toml\"]"))
    before = node.config.read_text()
    node.run()
    assert _uninstall(node).returncode == 100
    assert node.config.read_text() == before and not node.drop_in.exists()   # the user's own entry stays
    other = Node(tmp_path / "b") if (tmp_path / "b").mkdir() is None else None
    assert other is not None
    other.write_config(USER_V2)
    other.run()
    (other.conf_d / "50-gpu.toml").write_text("version = 2\n")     # e.g. NVIDIA's toolkit, added later
    assert _uninstall(other).returncode == 100
    assert other.entry in other.main()["imports"] and not other.drop_in.exists()


def test_remove_import_keeps_every_other_byte():
    assert install.remove_import('version = 2\nimports = ["/d"]\n[a]\n', "/d") == 'version = 2\n[a]\n'
    assert install.remove_import('imports = ["/x", "/d"] # c\n', "/d") == 'imports = ["/x"] # c\n'
    assert install.remove_import('version = 2\n', "/d") is None
    for text in (USER_V2, USER_V3):
        added = install.add_import(text, "/etc/containerd/conf.d/*.toml")
        assert install.remove_import(added, "/etc/containerd/conf.d/*.toml") == text


@pytest.mark.parametrize("text", [USER_V2, USER_V3, DEFAULT_V2, DEFAULT_V3,
                                  USER_V2.replace("\n", "\r\n"), "version = 2\n\n\n[a]  # t\n\tx = 'y'\n",
                                  "# only a comment", 'version = 3\nimports = [ "/x" ,\n\n]\n'])
def test_add_import_keeps_every_byte(text):
    new = install.add_import(text, "/etc/containerd/conf.d/*.toml")
    assert tomllib.loads(new) == {**tomllib.loads(text),
                                  "imports": [*tomllib.loads(text).get("imports", []), "/etc/containerd/conf.d/*.toml"]}
    rest = iter(new)
    assert all(c in rest for c in text)                     # the old text is still there, in order
    assert len(new) - len(text) <= len('imports = ["/etc/containerd/conf.d/*.toml"]\r\n')


def test_drop_in_text_round_trips():
    data = {"version": 2, "plugins": {"a.b": {"k": "v\"\\\n", "n": 1, "f": 1.5, "t": True, "l": ["x", 2],
                                              "empty": {}, "c": {"d": {"e": [{"x": 1}]}}}}}
    text = dropin.render(data, 2, "/etc/containerd/config.toml")
    assert tomllib.loads(text) == data
    assert text.startswith("# Written by thaw's install/containerd.sh")


# --------------------------------------------------------------------------- install, containerd 1.x

def test_v2_fresh_node_creates_minimal_main_config(tmp_path):
    node = Node(tmp_path)
    out = node.run().stdout
    assert "not restarting containerd" in out
    main = node.main()
    assert main == {"version": 2, "imports": [node.entry]}
    drop = node.drop()
    assert drop["version"] == 2
    assert list(drop["plugins"]) == [CRI_V2]
    assert_thaw_entry(thaw_entry(drop, CRI_V2), str(node.runtime))
    # the default runtime is kept: defining any runtime replaces containerd 1.x's default map
    runc = drop["plugins"][CRI_V2]["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert node.backups() == []
    assert all(ok for ok, _, _ in checks.registration_checks(str(node.config), 1))


def test_v2_existing_config_is_kept_byte_for_byte(tmp_path):
    node = Node(tmp_path, version=V16_DEBIAN)
    original = node.write_config(USER_V2)
    node.run()
    new = node.config.read_bytes()
    line = f'imports = ["{node.entry}"]\n'.encode()
    # one line after the last top-level key, nothing else
    assert new == original.replace(b'root = "/var/lib/containerd"\n', b'root = "/var/lib/containerd"\n' + line, 1)
    [backup] = node.backups()
    assert open(backup, "rb").read() == original
    # containerd 1.x replaces the whole CRI section with the drop-in's: it must carry the user's
    drop = node.drop()
    cri = drop["plugins"][CRI_V2]
    user_cri = tomllib.loads(USER_V2)["plugins"][CRI_V2]
    assert cri["sandbox_image"] == user_cri["sandbox_image"] and cri["cni"] == user_cri["cni"]
    assert cri["registry"] == user_cri["registry"]
    assert cri["containerd"]["runtimes"]["runc"] == user_cri["containerd"]["runtimes"]["runc"]
    assert "io.containerd.internal.v1.opt" not in drop["plugins"]      # only the CRI section
    entry = thaw_entry(drop, CRI_V2)
    assert_thaw_entry(entry, str(node.runtime))
    assert entry["options"]["SystemdCgroup"] is True                   # follows the default runtime
    res = checks.registration_checks(str(node.config), 1)
    assert res and all(ok for ok, _, _ in res), res
    stale = checks.stale_check(merge.load_files(str(node.config)), str(node.drop_in))
    assert stale and stale[0]


def test_v2_rerun_is_idempotent(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2)
    node.run()
    before = {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in (node.config, node.drop_in)}
    backups = node.backups()
    proc = node.run()
    assert "nothing changed" in proc.stdout
    assert {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in before} == before
    assert node.backups() == backups


def test_a_drop_in_with_the_same_content_is_not_rewritten(tmp_path):
    # e.g. written by an earlier thaw with other formatting: no rewrite, so no containerd restart
    node = Node(tmp_path)
    node.write_config(USER_V2)
    node.run()
    reformatted = "# an older thaw wrote this\n" + node.drop_in.read_text().replace(" = ", "=")
    node.drop_in.write_text(reformatted)
    assert "nothing changed" in node.run().stdout
    assert node.drop_in.read_text() == reformatted


def test_without_thaws_virtualenv_it_says_how_to_get_it(tmp_path):
    node = Node(tmp_path)
    original = node.write_config(USER_V2)
    proc = node.run(check=False, THAW_PYTHON=str(tmp_path / "no-venv" / "bin" / "python"))
    assert proc.returncode != 0
    assert "thaw's virtualenv is missing" in proc.stderr and "install/node.sh" in proc.stderr
    assert node.config.read_bytes() == original and not node.drop_in.exists()


def test_existing_imports_array_is_extended(tmp_path):
    node = Node(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "registry.toml").write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    text = f'version = 2\nimports = [\n  "{other}/*.toml",  # registries\n]\n\n[plugins."io.containerd.internal.v1.opt"]\n  path = "/opt/containerd"\n'
    node.write_config(text)
    node.run()
    new = node.config.read_text()
    # a multi-line array gets the entry on a line of its own, indented like the others
    assert new == text.replace("# registries\n", f'# registries\n  "{node.entry}",\n')
    assert node.main()["imports"] == [f"{other}/*.toml", node.entry]
    # the CRI section the other import set is what the drop-in carries
    assert node.drop()["plugins"][CRI_V2]["registry"] == {"config_path": "/etc/containerd/certs.d"}


def test_a_symlinked_main_config_stays_a_symlink(tmp_path):
    node = Node(tmp_path)
    real = tmp_path / "real-config.toml"
    real.write_text(USER_V2)
    node.etc.mkdir(parents=True)
    node.config.symlink_to(real)
    node.run()
    assert node.config.is_symlink() and node.main()["imports"] == [node.entry]


def test_an_import_glob_that_covers_the_drop_in_leaves_the_main_config_alone(tmp_path):
    node = Node(tmp_path)
    original = node.write_config('version = 2\nimports = ["conf.d/*.toml"]\n')
    proc = node.run()
    assert "already imports" in proc.stdout
    assert node.config.read_bytes() == original and node.backups() == []
    assert node.drop_in.exists()


def test_files_already_in_conf_d_are_carried_into_the_v2_drop_in(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2)
    node.conf_d.mkdir()
    (node.conf_d / "10-registry.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    out = node.run().stdout
    assert "10-registry.toml" in out                      # newly loaded through the glob: said so
    cri = node.drop()["plugins"][CRI_V2]
    # containerd 1.x: the CRI section of 10-registry.toml replaced config.toml's; the drop-in follows
    assert cri == {"registry": {"config_path": "/etc/containerd/certs.d"}, "containerd": cri["containerd"]}
    assert set(cri["containerd"]["runtimes"]) == {"runc", "thaw"}


def test_a_later_import_that_replaces_the_cri_section_is_refused(tmp_path):
    node = Node(tmp_path)
    original = node.write_config(USER_V2)
    node.conf_d.mkdir()
    (node.conf_d / "zz-late.toml").write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "x"\n')
    proc = node.run(check=False)
    assert proc.returncode != 0 and "zz-late.toml" in proc.stderr
    assert node.config.read_bytes() == original and not node.drop_in.exists()


def test_version_1_config_is_refused_and_nothing_changes(tmp_path):
    node = Node(tmp_path)
    original = node.write_config('[plugins.cri]\n  sandbox_image = "x"\n')
    proc = node.run(check=False)
    assert proc.returncode != 0 and "version" in proc.stderr
    assert node.config.read_bytes() == original and not node.drop_in.exists()


def test_containerd_rejecting_the_result_rolls_everything_back(tmp_path):
    node = Node(tmp_path, dump_fails=True)
    original = node.write_config(USER_V2)
    proc = node.run(check=False)
    assert proc.returncode != 0 and "boom" in proc.stderr
    assert node.config.read_bytes() == original and not node.drop_in.exists()


def test_stale_drop_in_is_reported_and_fixed_by_a_rerun(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2)
    node.run()
    text = node.config.read_text().replace("pause:3.9", "pause:3.10")
    node.config.write_text(text)
    stale = checks.stale_check(merge.load_files(str(node.config)), str(node.drop_in))
    assert stale is not None
    ok, _what, detail = stale
    assert not ok and "install/containerd.sh" in detail
    node.run()
    stale = checks.stale_check(merge.load_files(str(node.config)), str(node.drop_in))
    assert stale and stale[0]
    assert node.drop()["plugins"][CRI_V2]["sandbox_image"] == "registry.k8s.io/pause:3.10"


# --------------------------------------------------------------------------- install, containerd 2.x

def test_v3_fresh_node(tmp_path):
    node = Node(tmp_path, version=V21, default=DEFAULT_V3)
    node.run()
    assert node.main() == {"version": 3, "imports": [node.entry]}
    drop = node.drop()
    assert drop["version"] == 3
    # containerd 2.x merges imports key by key: the drop-in only holds the thaw table
    assert list(drop["plugins"]) == [CRI_V3]
    assert list(drop["plugins"][CRI_V3]) == ["containerd"]
    assert list(drop["plugins"][CRI_V3]["containerd"]) == ["runtimes"]
    assert list(drop["plugins"][CRI_V3]["containerd"]["runtimes"]) == ["thaw"]
    entry = thaw_entry(drop, CRI_V3)
    assert_thaw_entry(entry, str(node.runtime))
    assert entry["sandboxer"] == "podsandbox"
    assert all(ok for ok, _, _ in checks.registration_checks(str(node.config), 2))


def test_v3_existing_config_inherits_systemd_cgroup(tmp_path):
    node = Node(tmp_path, version=V21, default=DEFAULT_V3)
    original = node.write_config(USER_V3)
    node.run()
    assert node.config.read_bytes() == original.replace(
        b"version = 3\n", f'version = 3\nimports = ["{node.entry}"]\n'.encode(), 1)
    entry = thaw_entry(node.drop(), CRI_V3)
    assert_thaw_entry(entry, str(node.runtime))
    assert entry["options"]["SystemdCgroup"] is True
    assert "already imports" in node.run().stdout


def test_containerd_2_with_a_version_2_main_config_gets_a_version_2_drop_in(tmp_path):
    # containerd 2.x refuses an import with a higher version than the main config
    node = Node(tmp_path, version=V21, default=DEFAULT_V3)
    node.write_config(USER_V2)
    node.run()
    drop = node.drop()
    assert drop["version"] == 2
    assert list(drop["plugins"][CRI_V2]["containerd"]["runtimes"]) == ["thaw"]
    assert_thaw_entry(thaw_entry(drop, CRI_V2), str(node.runtime))
    # containerd 2.x reads the version 2 main config in the version 3 layout: the runc entry the
    # thaw entry starts from is found there
    assert thaw_entry(drop, CRI_V2)["options"]["SystemdCgroup"] is True
    assert all(ok for ok, _, _ in checks.registration_checks(str(node.config), 2))


# ---------------------------------------------------------------------------------------- checks

def test_checks_reject_a_config_without_the_handler(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2)
    [(ok, what, detail)] = checks.registration_checks(str(node.config), 1)
    assert not ok and "thaw" in what and "install/node.sh --containerd" in detail


def test_checks_reject_a_wrong_handler(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2 + '\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw]\n'
                      '  runtime_type = "io.containerd.runc.v1"\n  pod_annotations = ["*"]\n'
                      '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw.options]\n'
                      f'    BinaryName = "{tmp_path}/missing"\n')
    bad = {what.split()[-1] for ok, what, _ in checks.registration_checks(str(node.config), 1) if not ok}
    assert bad == {"runtime_type", "BinaryName", "pod_annotations", "container_annotations"}


def test_checks_catch_a_drop_in_that_dropped_the_default_runtime(tmp_path):
    node = Node(tmp_path)
    node.etc.mkdir(parents=True)
    node.conf_d.mkdir()
    node.config.write_text(f'version = 2\nimports = ["{node.conf_d}/*.toml"]\n')
    # what a naive drop-in does on containerd 1.x: runtimes = {thaw} only, runc gone
    (node.conf_d / "50-naive.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw]\n'
        '  runtime_type = "io.containerd.runc.v2"\n  pod_annotations = ["thaw.dev/*"]\n'
        '  container_annotations = ["thaw.dev/*"]\n'
        f'  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw.options]\n    BinaryName = "{node.runtime}"\n')
    bad = [what for ok, what, _ in checks.registration_checks(str(node.config), 1) if not ok]
    assert bad == ["containerd default runtime"]
    assert all(ok for ok, _, _ in checks.registration_checks(str(node.config), 2))   # 2.x keeps runc


def test_doctor_checks(tmp_path):
    node = Node(tmp_path)
    node.write_config(USER_V2)
    res = checks.doctor_checks(str(node.config), node.containerd, str(node.conf_d))
    # installed but not running (its socket is absent): handler missing is not a failure yet
    assert all(ok for ok, _, _ in res), res
    assert any("not registered" in d for _, _, d in res)
    # running without the handler: a failure naming the fix
    sock = tmp_path / "ctr.sock"
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    try:
        node.config.write_text(USER_V2.replace("/run/containerd/containerd.sock", str(sock)))
        res = checks.doctor_checks(str(node.config), node.containerd, str(node.conf_d))
        assert [ok for ok, _, _ in res] == [True, False], res
        assert "install/node.sh --containerd" in res[1][2]
        node.run()
        res = checks.doctor_checks(str(node.config), node.containerd, str(node.conf_d))
        assert all(ok for ok, _, _ in res), res
        assert "containerd drop-in in sync" in [w for _, w, _ in res]
    finally:
        s.close()


def test_doctor_without_containerd(monkeypatch):
    monkeypatch.setattr(checks, "find_containerd", lambda: None)
    assert checks.doctor_checks() == [(True, "containerd", "not installed")]


def test_doctor_run_checks_ends_with_the_containerd_checks(monkeypatch):
    from thaw.shim.entry import doctor
    from thaw.shim.node.config import Config
    monkeypatch.setattr(checks, "find_containerd", lambda: None)
    assert list(doctor.run_checks(Config()))[-1] == (True, "containerd", "not installed")


# ----------------------------------------------------------------------------- real containerd

# (build source, main config version): Debian 12's 1.6 and trixie's 1.7 read version 2; sid's 2.x
# reads both (Debian's own /etc/containerd/config.toml is still version 2, `containerd config
# default` of 2.x writes version 3).
REAL = [("node", 2), ("trixie", 2), ("sid", 2), ("sid", 3)]
_BUILDS = {b.source: b for b in builds.builds()}


def _real_build(source: str):
    build = _BUILDS[source]
    missing = build.missing()
    if missing:
        (pytest.fail if STRICT else pytest.skip)(f"prerequisite missing: {missing}")
    return build


def _user_config(layout: int, work, sock) -> str:
    """A user's main config of this version for a private containerd under `work`."""
    head = (f'version = {layout}\nroot = "{work}/root"\nstate = "{work}/state"\n'
            '# NRI would listen on the host-wide /var/run/nri/nri.sock\n'
            'disabled_plugins = ["io.containerd.nri.v1.nri"]\n\n'
            f'[grpc]\n  address = "{sock}"\n\n')
    if layout == 2:
        return head + (
            '[plugins]\n  [plugins."io.containerd.grpc.v1.cri"]\n    sandbox_image = "registry.k8s.io/pause:3.9"\n'
            '    [plugins."io.containerd.grpc.v1.cri".cni]\n      bin_dir = "/usr/lib/cni"\n'
            f'      conf_dir = "{work}/cni"\n'
            '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n      SystemdCgroup = true\n')
    return head + (
        "[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = 'registry.k8s.io/pause:3.9'\n\n"
        "[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = ['/usr/lib/cni']\n"
        f"  conf_dir = '{work}/cni'\n\n"
        "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n  SystemdCgroup = true\n")


def _without_thaw(dump: dict, plugin: str) -> dict:
    dump = dict(dump)
    dump.pop("imports", None)
    dump["plugins"][plugin]["containerd"]["runtimes"].pop("thaw", None)
    return dump


@pytest.mark.root
@pytest.mark.containerd
@pytest.mark.parametrize("source,layout", REAL, ids=[f"{_BUILDS[s].id}-v{v}" for s, v in REAL])
def test_real_containerd_loads_the_handler(tmp_path, source, layout):
    """containerd itself merges the main config and the drop-in: `config dump` shows the handler
    and otherwise exactly the config it showed before; a private containerd started on the result
    loads its CRI plugin."""
    build = _real_build(source)
    binary = build.bin("containerd")
    node = Node(tmp_path)
    work = tmp_path / "ctrd"
    sock = work / "containerd.sock"
    node.write_config(_user_config(layout, work, sock))
    plugin = CRI_V3 if build.major >= 2 else CRI_V2       # where `config dump` shows the runtimes

    def dump() -> dict:
        proc = subprocess.run([binary, "--config", str(node.config), "config", "dump"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return tomllib.loads(proc.stdout)

    before = dump()
    out = node.run(CONTAINERD_BIN=binary).stdout
    assert f"config version {layout}" in out
    assert node.drop()["version"] == layout
    after = dump()
    entry = after["plugins"][plugin]["containerd"]["runtimes"]["thaw"]
    assert_thaw_entry(entry, str(node.runtime))
    assert entry["pod_annotations"] == ["thaw.dev/*"] and entry["container_annotations"] == ["thaw.dev/*"]
    assert entry["options"]["SystemdCgroup"] is True
    # 1.x lists the files it loaded, 2.x the imports entries
    assert (str(node.drop_in) if build.major < 2 else node.entry) in after["imports"]
    assert _without_thaw(after, plugin) == _without_thaw(before, plugin)

    # The CRI plugin validates its config when it starts: run a private containerd on it, with
    # the build's own shim first on PATH.
    (work / "cni").mkdir(parents=True, exist_ok=True)
    log = open(tmp_path / "containerd.log", "w")
    env = {**os.environ, "PATH": f"{build.bin_dir}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([binary, "--config", str(node.config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 30
        plugins = ""
        while time.monotonic() < deadline:
            if sock.exists():
                r = subprocess.run([build.bin("ctr"), "--address", str(sock), "plugins", "ls"],
                                   capture_output=True, text=True)
                if r.returncode == 0 and "cri" in r.stdout:
                    plugins = r.stdout
                    break
            assert proc.poll() is None, (tmp_path / "containerd.log").read_text()[-3000:]
            time.sleep(0.2)
        [cri] = [line.split() for line in plugins.splitlines() if line.split()[:2] == ["io.containerd.grpc.v1", "cri"]]
        assert cri[-1] == "ok", (tmp_path / "containerd.log").read_text()[-3000:]
        # and thaw doctor's checks see the running containerd with the handler
        res = checks.doctor_checks(str(node.config), binary, str(node.conf_d))
        assert all(ok for ok, _, _ in res), res
        assert "(running)" in res[0][2]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

#!/bin/bash
# Inside a distribution root that ships containerd (tests/bundle/in_root.sh with
# SMOKE_SCRIPT=containerd_smoke.sh): install thaw from the bundle, start that distribution's own
# containerd, run a busybox counter through containerd's runc shim with thaw-runtime as its runtime
# binary (`ctr run --config SPEC --runc-binary`), capture it, and restore it into a new container containerd
# creates with `thaw.dev/snapshot` (the shim -> thaw-runtime's C front -> the Python runtime).
#   containerd_smoke.sh BUNDLE.tar.gz
set -euo pipefail
B=$1
say() { printf '[containerd-smoke] %s\n' "$*"; }
fail() { printf '[containerd-smoke] FAIL: %s\n' "$*" >&2; tail -n 30 /tmp/containerd.log >&2 || true; exit 1; }

v=$(tar -xzf "$B" -O --wildcards 'opt/thaw/*/share/VERSION')
tar -xzf "$B" -C /
/opt/thaw/"$v"/share/thaw-node.sh install >/dev/null || fail "install"
command -v containerd >/dev/null || fail "this root ships no containerd"
say "$(containerd --version)"

# The distribution's containerd, without CRI (no CNI here); the shim is the distribution's too.
mkdir -p /var/lib/containerd /run/containerd
printf 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n' > /tmp/containerd.toml
containerd --config /tmp/containerd.toml >/tmp/containerd.log 2>&1 &
for _ in $(seq 200); do ctr version >/dev/null 2>&1 && break; sleep 0.05; done
ctr version >/dev/null 2>&1 || fail "containerd did not start"

NS=thaw-smoke    # its cgroups are /thaw-smoke/<id> (in_root.sh removes them)
counter() {  # id dir [snapshot]: a container whose shell counts into dir/rootfs/tick
  mkdir -p "$2/rootfs/bin" "$2"/rootfs/{proc,sys,dev,tmp,etc}
  cp /bin/busybox "$2/rootfs/bin/busybox"
  for a in sh sleep echo; do ln -sf busybox "$2/rootfs/bin/$a"; done
  # The whole spec from a file (ctr run --config): ctr 1.4 (Debian 11) has no --annotation.
  /opt/thaw/current/python/bin/python3 -IS - "$2" "${3:-}" "$1" <<'EOF2'
import json, sys
path, snap, cid = sys.argv[1:4]
ann = {"org.opencontainers.image.ref.name": "smoke/busybox:1", **({"thaw.dev/snapshot": snap} if snap else {})}
spec = {"ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
                    "args": ["sh", "-c", "i=0; while true; do echo $i > /tick; i=$((i+1)); sleep 0.05; done"],
                    "env": ["PATH=/bin"], "noNewPrivileges": True,
                    "capabilities": {k: ["CAP_KILL"] for k in ("bounding", "effective", "permitted")}},
        "root": {"path": f"{path}/rootfs"}, "hostname": "smoke", "annotations": ann,
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                   {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}],
        "linux": {"cgroupsPath": f"/thaw-smoke/{cid}",
                  "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]}}
json.dump(spec, open(f"{path}/spec.json", "w"))
EOF2
  ctr -n $NS run -d --config "$2/spec.json" --runc-binary /usr/local/bin/thaw-runtime "$1" >/dev/null \
    || fail "ctr run $1"
}
tick() {  # the counter's last value; the shell truncates before it writes: read again when empty
  local t
  for _ in 1 2 3 4 5; do
    t=$(cat "$1/rootfs/tick" 2>/dev/null || true)
    case "$t" in ''|*[!0-9]*) sleep 0.01 ;; *) echo "$t"; return ;; esac
  done
  echo -1
}
remove() {
  ctr -n $NS task kill -s SIGKILL "$1" >/tmp/ctr-delete.log 2>&1 || true
  for _ in $(seq 100); do ctr -n $NS task delete "$1" >>/tmp/ctr-delete.log 2>&1 && break; sleep 0.05; done
  ctr -n $NS task ls >>/tmp/ctr-delete.log 2>&1 || true
  ctr -n $NS container delete "$1" >>/tmp/ctr-delete.log 2>&1 || fail "container delete $1: $(head -n 4 /tmp/ctr-delete.log)"
}

counter src /tmp/src
for _ in $(seq 200); do [ "$(tick /tmp/src)" -ge 20 ] && break; sleep 0.05; done
[ "$(tick /tmp/src)" -ge 20 ] || fail "the counter did not count: $(tick /tmp/src)"
THAW_CONFIG=/etc/thaw/config.yaml thaw capture src --name smoke:v1 --root /run/containerd/runc/$NS \
  || fail "capture"
remove src
before=$(tick /tmp/src)
counter dst /tmp/dst smoke:v1
first=$(tick /tmp/dst)     # read at once: a cold start would be at 0 (or have no file yet)
[ "$first" -ge 20 ] || fail "not restored: tick $first (source reached $before)"
sleep 0.3
[ "$(tick /tmp/dst)" -gt "$first" ] || fail "the restored counter does not count"
remove dst
say "PASS: capture -> restore through containerd $(containerd --version | awk '{print $3}') (source reached $before, restored at $first)"

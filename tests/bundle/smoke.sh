#!/bin/bash
# Inside a distribution root with no network (tests/bundle/in_root.sh runs it chrooted): install
# thaw from the bundle, `thaw doctor`, `criu check`, capture a busybox counter and restore it
# through thaw-runtime. With a second bundle: a container started by version N keeps running over
# the upgrade to N+1, N+1 deletes it and restores N's snapshot, rollback to N works, and
# uninstall removes the commands and keeps the store (then --purge removes it).
#   smoke.sh BUNDLE_N.tar.gz [BUNDLE_N1.tar.gz]
set -euo pipefail
N=$1 N1=${2:-}
say() { printf '[smoke] %s\n' "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }
ver() { tar -xzf "$1" -O --wildcards 'opt/thaw/*/share/VERSION'; }

install_bundle() {
  local t0 v
  v=$(ver "$1")
  t0=$(date +%s%N)
  tar -xzf "$1" -C /
  /opt/thaw/"$v"/share/thaw-node.sh install
  say "install_ms $(( ($(date +%s%N) - t0) / 1000000 )) ($v)"
}

R=/run/smoke-runc
mkdir -p $R
counter_bundle() {  # dir [snapshot]
  mkdir -p "$1/rootfs/bin" "$1"/rootfs/{proc,sys,dev,tmp,etc}
  cp /bin/busybox "$1/rootfs/bin/busybox"
  for a in sh sleep echo; do ln -sf busybox "$1/rootfs/bin/$a"; done
  /opt/thaw/current/python/bin/python3 -IS - "$1" "${2:-}" <<'EOF'
import json, sys, uuid
path, snap = sys.argv[1], sys.argv[2]
ann = {"org.opencontainers.image.ref.name": "smoke/busybox:1"}
if snap:
    ann["thaw.dev/snapshot"] = snap
spec = {"ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
                    "args": ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"],
                    "env": ["PATH=/bin"], "noNewPrivileges": True,
                    "capabilities": {k: ["CAP_KILL"] for k in ("bounding", "effective", "permitted")}},
        "root": {"path": "rootfs"}, "hostname": "smoke", "annotations": ann,
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                   {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}],
        "linux": {"cgroupsPath": f"/thaw-smoke/{uuid.uuid4().hex[:8]}",
                  "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]}}
json.dump(spec, open(f"{path}/config.json", "w"))
EOF
}
run_counter() {  # dir id: create + start; stdout a pipe (as containerd's shim gives) into dir/out
  thaw-runtime --root $R --log "$1/log.json" --log-format json create --bundle "$1" --pid-file "$1/pid" "$2" \
    </dev/null > >(exec cat >"$1/out" 2>/dev/null) 2>&1 || fail "create $2: $(tail -c 1500 "$1/log.json")"
  thaw-runtime --root $R start "$2" 2>/dev/null || true   # a no-op for a restored container
}
last_tick() { grep -o 'tick [0-9]*' "$1/out" | tail -n1 | cut -d' ' -f2; }
first_tick() { grep -o 'tick [0-9]*' "$1/out" | head -n1 | cut -d' ' -f2; }
wait_ticks() {  # dir n
  for _ in $(seq 200); do [ "$(grep -c tick "$1/out" 2>/dev/null)" -ge "$2" ] && return 0; sleep 0.05; done
  fail "no output from $1: $(cat "$1/out")"
}
delete() { thaw-runtime --root $R kill "$1" KILL 2>/dev/null || true; sleep 0.2; thaw-runtime --root $R delete --force "$1" || fail "delete $1"; }

install_bundle "$N"
thaw doctor --skip-containerd || fail "thaw doctor"
/opt/thaw/current/sbin/criu check || fail "criu check"
say "doctor and criu check: ok"

counter_bundle /tmp/src
run_counter /tmp/src src
wait_ticks /tmp/src 20
THAW_CONFIG=/etc/thaw/config.yaml thaw capture src --name smoke:v1 --root $R || fail "capture"
delete src
before=$(last_tick /tmp/src)
counter_bundle /tmp/dst smoke:v1
run_counter /tmp/dst dst
wait_ticks /tmp/dst 10
first=$(first_tick /tmp/dst)
[ "$first" -gt 5 ] && [ "$first" -le $((before + 1)) ] || fail "not restored: first tick $first, source reached $before"
grep -q '"restored"\|restore' /tmp/dst/log.json || true
say "capture -> restore: ok (source reached $before, the restored loop went on at $first)"
[ -n "$N1" ] || { delete dst; say "PASS"; exit 0; }

# --- upgrade while dst runs ---------------------------------------------------------------------
vN=$(ver "$N") vN1=$(ver "$N1")
install_bundle "$N1"
[ "$(readlink /opt/thaw/current)" = "$vN1" ] && [ "$(readlink /opt/thaw/previous)" = "$vN" ] || fail "links after upgrade"
n0=$(grep -c tick /tmp/dst/out); sleep 0.5
[ "$(grep -c tick /tmp/dst/out)" -gt "$n0" ] || fail "the container started by $vN stopped over the upgrade"
thaw ls | grep -q smoke:v1 || fail "the snapshot made by $vN is gone after the upgrade"
delete dst
say "upgrade: the running container kept running, $vN1 deleted it"
counter_bundle /tmp/dst2 smoke:v1
run_counter /tmp/dst2 dst2
wait_ticks /tmp/dst2 5
[ "$(first_tick /tmp/dst2)" -gt 5 ] || fail "$vN1 did not restore $vN's snapshot"
delete dst2
say "upgrade: $vN1 restored the snapshot $vN made"

/opt/thaw/current/share/thaw-node.sh rollback
[ "$(readlink /opt/thaw/current)" = "$vN" ] || fail "rollback"
[ "$(readlink /usr/local/bin/thaw-runtime)" = /opt/thaw/current/bin/thaw-runtime ] || fail "commands after rollback"
thaw doctor --skip-containerd --quiet || fail "doctor after rollback"
say "rollback to $vN: ok"

# A thaw process of the current version still runs: uninstall must leave its files.
/opt/thaw/"$vN"/python/bin/python3 -IS -c 'import time; time.sleep(60)' &
user=$!
sleep 0.3
/opt/thaw/current/share/thaw-node.sh uninstall
[ -x /opt/thaw/"$vN"/python/bin/python3 ] || fail "uninstall removed $vN while a process ran from it"
[ -d /var/lib/thaw ] && [ ! -e /usr/local/bin/thaw-runtime ] || fail "uninstall removed the store without --purge, or left the commands"
kill $user; wait $user 2>/dev/null || true
/opt/thaw/"$vN"/share/thaw-node.sh uninstall --purge
[ ! -e /opt/thaw/"$vN" ] && [ ! -e /var/lib/thaw ] || fail "a second uninstall --purge did not remove $vN's unused files and the store"
[ ! -e /usr/local/bin/thaw ] && [ ! -e /opt/thaw/current ] || fail "uninstall left commands or links"
say "uninstall: commands gone, the version in use kept until its process ended, then --purge removed it and the store"
say "PASS"

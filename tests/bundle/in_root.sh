#!/bin/bash
# Run tests/bundle/smoke.sh in a distribution root (a tarball from mmdebstrap) with networking
# unshared: a network namespace holding only a loopback device, so nothing is reachable.
#   in_root.sh ROOT_TAR WORK_DIR BUNDLE_N.tar.gz [BUNDLE_N1.tar.gz]
# WORK_DIR (created, removed at the end) holds the unpacked root. The host's /dev, /sys (cgroups)
# and a fresh /proc, /run and /tmp are mounted into it, in a mount namespace of its own whose root
# it becomes.
set -euo pipefail
root_tar=$1 work=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work/root"
cleanup() {
  rm -rf "$work"
  # the containers' cgroups (cgroupsPath /thaw-smoke/...), empty once the pid namespace is gone
  find /sys/fs/cgroup -depth -type d -path '*/thaw-smoke*' -exec rmdir {} + 2>/dev/null || true
}
trap cleanup EXIT
tar -xf "$root_tar" -C "$work/root"
args=()
for b in "$@"; do cp "$b" "$work/root/tmp/" && args+=("/tmp/$(basename "$b")"); done
cp "$here/${SMOKE_SCRIPT:-smoke.sh}" "$work/root/tmp/smoke.sh"   # containerd_smoke.sh: through the root's containerd
# A pid namespace too: when the smoke ends, however it ends, the kernel kills what it left running.
SMOKE_X=${SMOKE_X:-} unshare --net --mount --propagation private --pid --fork --kill-child -- bash -s "$work/root" "${args[@]}" <<'EOF'
set -euo pipefail
r=$1; shift
# The root becomes this mount namespace's root (pivot_root), as on a node: CRIU walks the mount
# tree from / and finds no parent for mounts below a plain chroot.
mount --bind "$r" "$r"
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
mount -t tmpfs -o mode=0755 tmpfs "$r/run"
mount --bind "$r/tmp" "$r/tmp"
ip link set lo up   # CRIU probes TCP repair over loopback; still no route off this host
ip route get 1.1.1.1 >/dev/null 2>&1 && { echo "[in_root] a route leaves this namespace" >&2; exit 1; }
. "$r/etc/os-release"; echo "[in_root] $PRETTY_NAME, no network: $(ip -o link | wc -l) link(s)"
cd "$r" && pivot_root . . && umount -l .
exec /usr/bin/env -i PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin HOME=/root /bin/bash ${SMOKE_X:+-x} /tmp/smoke.sh "$@"
EOF

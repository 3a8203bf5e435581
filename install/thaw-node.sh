#!/usr/bin/env bash
# thaw's node installer, shipped inside the bundle (install/bundle.sh) at
# /opt/thaw/<version>/share/thaw-node.sh. Needs no network, compiler or package manager.
#
#   thaw-node.sh install   [--root DIR] [--containerd]   make this bundle's version the current one
#   thaw-node.sh rollback  [--root DIR] [VERSION]        make VERSION (default: the previous) current
#   thaw-node.sh uninstall [--root DIR] [--purge]        remove thaw (--purge: also store and config)
#   thaw-node.sh versions  [--root DIR]
#   thaw-node.sh copy      --root DIR                    only copy this version into DIR/opt/thaw
#
# --root DIR: a host mounted at DIR (the installer image mounts the node's / at /host): the bundle
# is copied to DIR/opt/thaw/<version> and the rest runs chrooted there, with the bundle's own
# interpreter and C library, whatever the host's distribution.
# Layout: /opt/thaw/<version>/ (never changed once installed), /opt/thaw/current and
# /opt/thaw/previous (links), commands thaw, thaw-runtime, thaw-hook in $THAW_BIN_DIR
# (default /usr/local/bin) linking to /opt/thaw/current/bin/. A launcher names its own version's
# interpreter, so a thaw process started before an upgrade runs on with its version's files;
# a version directory is removed only when it is neither current nor previous and no process
# maps a file under it.
# Environment: THAW_BIN_DIR; for --containerd, those of install/containerd.sh (CONTAINERD_CONFIG,
# CONTAINERD_CONF_D, CONTAINERD_BIN, THAW_CONTAINERD_RESTART).
set -euo pipefail

BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
VERSION=$(cat "$BUNDLE/share/VERSION")
TOP=/opt/thaw
BIN_DIR=${THAW_BIN_DIR:-/usr/local/bin}
COMMANDS=(thaw thaw-runtime thaw-hook)

say() { printf '[thaw node] %s\n' "$*"; }
die() { printf '[thaw node] ERROR: %s\n' "$*" >&2; exit 1; }

cmd=${1:-}
[ -n "$cmd" ] || { sed -n '2,22p' "$0"; exit 2; }
shift
ROOT="" CONTAINERD=0 PURGE=0 TARGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a directory}; shift ;;
    --containerd) CONTAINERD=1 ;;
    --purge) PURGE=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) TARGET=$1 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "must run as root"

if [ -n "$ROOT" ] && [ "$(cd "$ROOT" && pwd -P)" != / ]; then
  # Into a mounted host: copy this version (atomically: a half-copied version never exists),
  # then run this same script there.
  [ -d "$ROOT/proc/1" ] || say "note: $ROOT/proc is not mounted: versions in use there cannot be seen"
  if { [ "$cmd" = install ] || [ "$cmd" = copy ]; } && [ ! -f "$ROOT$TOP/$VERSION/share/VERSION" ]; then
    mkdir -p "$ROOT$TOP"
    tmp=$(mktemp -d "$ROOT$TOP/.incoming.XXXXXX")
    cp -a "$BUNDLE/." "$tmp/"
    chmod 0755 "$tmp"
    mv -T "$tmp" "$ROOT$TOP/$VERSION"
    say "copied $VERSION to $ROOT$TOP/$VERSION"
  fi
  [ "$cmd" = copy ] && exit 0
  args=()
  [ "$CONTAINERD" = 1 ] && args+=(--containerd)
  [ "$PURGE" = 1 ] && args+=(--purge)
  [ -n "$TARGET" ] && args+=("$TARGET")
  script=$TOP/$VERSION/share/thaw-node.sh
  [ -x "$ROOT$script" ] || script=$TOP/current/share/thaw-node.sh
  exec chroot "$ROOT" /bin/sh -c 'exec "$0" "$@"' "$script" "$cmd" "${args[@]}"
fi

[ "$BUNDLE" = "$TOP/$VERSION" ] || die "this bundle must be unpacked at $TOP/$VERSION (it is at $BUNDLE): tar -xzf thaw-node-$VERSION.tar.gz -C /"

py() {  # thaw's own Python, its packages on sys.path
  local v=$1; shift
  "$TOP/$v/python/bin/python3" -I -m "$@"
}

relink() {  # name target: replace a symlink atomically
  ln -sfn "$2" "$1.thaw-new" && mv -Tf "$1.thaw-new" "$1"
}

in_use() {  # version: true while a process maps a file under /opt/thaw/<version>/ or runs one
  local d
  for d in /proc/[0-9]*; do
    grep -qsF " $TOP/$1/" "$d/maps" && return 0
  done
  return 1
}

prune() {  # remove versions that are neither current nor previous, and that nothing runs
  local cur prev d v
  cur=$(readlink "$TOP/current" 2>/dev/null || true)
  prev=$(readlink "$TOP/previous" 2>/dev/null || true)
  for d in "$TOP"/*/; do
    v=$(basename "$d")
    [ -f "$d/share/VERSION" ] && [ ! -L "$TOP/$v" ] || continue
    [ "$v" = "$cur" ] || [ "$v" = "$prev" ] && continue
    if in_use "$v"; then
      say "keeping $TOP/$v: a running process still uses it (removed by a later install or uninstall)"
    else
      rm -rf "${TOP:?}/$v"
      say "removed $TOP/$v (no longer current or previous, unused)"
    fi
  done
}

activate() {  # version: make it current, link the commands
  local v=$1 cur
  [ -x "$TOP/$v/bin/thaw-runtime" ] || die "$TOP/$v is not an installed thaw version"
  cur=$(readlink "$TOP/current" 2>/dev/null || true)
  if [ -n "$cur" ] && [ "$cur" != "$v" ]; then relink "$TOP/previous" "$cur"; fi
  relink "$TOP/current" "$v"
  install -d -m 0755 "$BIN_DIR"
  for c in "${COMMANDS[@]}"; do relink "$BIN_DIR/$c" "$TOP/current/bin/$c"; done
  say "current: $v${cur:+ (was $cur)}; commands in $BIN_DIR: ${COMMANDS[*]}"
}

register_containerd() {
  command -v containerd >/dev/null || PATH="$PATH:/usr/local/bin:/usr/bin:/usr/sbin"
  THAW_PYTHON="$TOP/current/python/bin/python3" THAW_RUNTIME_BIN="$BIN_DIR/thaw-runtime" \
    bash "$TOP/current/share/containerd.sh" || die "registering the runtime handler with containerd failed"
}

case "$cmd" in
  install)
    t0=$(date +%s%N)
    "$TOP/$VERSION/python/bin/python3" -IS -c 'pass' || die "the bundled interpreter does not start here"
    activate "$VERSION"
    install -d -m 0755 /etc/thaw
    if [ ! -f /etc/thaw/config.yaml ]; then
      # The bundle's CRIU and runc, through `current`: an upgrade or rollback switches them too.
      sed -e "s|^criu: .*|criu: $TOP/current/sbin/criu|" -e "s|^next_runtime: .*|next_runtime: $TOP/current/sbin/runc|" \
          -e "s|^hook: .*|hook: $BIN_DIR/thaw-hook|" "$TOP/$VERSION/share/config.yaml" > /etc/thaw/config.yaml.thaw-new
      mv /etc/thaw/config.yaml.thaw-new /etc/thaw/config.yaml
      say "config: wrote /etc/thaw/config.yaml (criu and runc of $TOP/current)"
    else
      say "config: keeping /etc/thaw/config.yaml"
    fi
    install -d -m 0700 /var/lib/thaw /run/thaw
    [ "$CONTAINERD" = 1 ] && register_containerd
    prune
    "$BIN_DIR/thaw" doctor --quiet $([ "$CONTAINERD" = 1 ] || echo --skip-containerd) \
      || die "thaw doctor reports problems (run 'thaw doctor' for details)"
    say "installed $VERSION in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    ;;
  rollback)
    v=${TARGET:-$(readlink "$TOP/previous" 2>/dev/null || true)}
    [ -n "$v" ] || die "no previous version to roll back to (thaw-node.sh versions)"
    activate "$v"
    ;;
  versions)
    for d in "$TOP"/*/; do
      v=$(basename "$d")
      [ -f "$d/share/VERSION" ] && [ ! -L "$TOP/$v" ] || continue
      tag=""
      [ "$(readlink "$TOP/current" 2>/dev/null)" = "$v" ] && tag=" (current)"
      [ "$(readlink "$TOP/previous" 2>/dev/null)" = "$v" ] && tag=" (previous)"
      in_use "$v" && tag="$tag (in use)"
      echo "$v$tag"
    done
    ;;
  uninstall)
    # Runs again where a first uninstall left a version in use (or the store: --purge).
    command -v containerd >/dev/null || PATH="$PATH:/usr/local/bin:/usr/bin:/usr/sbin"
    if command -v containerd >/dev/null; then
      rc=0
      py "$VERSION" thaw.shim.containerd uninstall || rc=$?
      case $rc in
        0) ;;
        100) if [ -d /run/systemd/system ] && systemctl is-active --quiet containerd 2>/dev/null; then
               systemctl restart containerd && say "containerd restarted without the thaw handler"
             else
               say "restart containerd to drop the thaw handler"
             fi ;;
        *) die "removing the runtime handler from containerd's config failed (nothing was removed)" ;;
      esac
    fi
    for c in "${COMMANDS[@]}"; do
      case "$(readlink "$BIN_DIR/$c" 2>/dev/null)" in "$TOP"/*) rm -f "$BIN_DIR/$c" ;; esac
    done
    rm -f "$TOP/current" "$TOP/previous"
    prune
    if [ "$PURGE" = 1 ]; then
      rm -rf /var/lib/thaw /run/thaw /etc/thaw
      say "removed the store /var/lib/thaw, state /run/thaw and /etc/thaw"
    else
      say "kept the store /var/lib/thaw and /etc/thaw (uninstall --purge removes them)"
    fi
    rmdir "$TOP" 2>/dev/null || true
    say "uninstalled"
    ;;
  copy) die "copy needs --root DIR (a host mounted there)" ;;
  *) die "unknown command $cmd (install, rollback, uninstall, versions, copy)" ;;
esac

#!/usr/bin/env bash
# Register thaw's runtime handler "thaw" with containerd, then restart containerd.
# Idempotent: a re-run that finds everything in place changes nothing and restarts nothing.
#
#   install/containerd.sh        (install/node.sh --containerd runs it, after installing thaw)
#
# It runs `python -m thaw.shim.containerd install` with thaw's virtualenv ($THAW_PREFIX/venv, which
# install/node.sh builds): the logic is in shim/containerd/. What it writes:
#   - the drop-in $CONTAINERD_CONF_D/99-thaw.toml, in the config version the installed containerd
#     speaks (`containerd --version`): version 2, plugins."io.containerd.grpc.v1.cri", for
#     containerd 1.x; version 3, plugins."io.containerd.cri.v1.runtime", for 2.x (or version 2 when
#     the main config is still version 2). containerd 2.x merges imports key by key, so there the
#     drop-in holds the thaw runtime table only; containerd 1.x replaces whole plugin sections, so
#     there it also carries a copy of the CRI section of the main config (re-run this script after
#     editing that section; `thaw doctor` tells when it is stale);
#   - one entry in the top-level `imports` of the main config (a backup is kept next to it;
#     every other byte stays), unless an entry already covers the drop-in; a missing main config
#     is created with `version = N` and the imports line only.
# Before restarting, `containerd --config MAIN config dump` must load the result and show the
# handler, else every file is put back as it was.
#
# Environment (defaults in brackets):
#   CONTAINERD_CONFIG        main config [--config of the running containerd service, else /etc/containerd/config.toml]
#   CONTAINERD_CONF_D        drop-in directory [/etc/containerd/conf.d]
#   CONTAINERD_BIN           containerd binary [containerd on PATH]
#   THAW_RUNTIME_BIN         the handler's BinaryName [/usr/local/bin/thaw-runtime]
#   THAW_CONTAINERD_RESTART  0: never restart containerd [1: restart it when a file changed and
#                            systemd runs it; otherwise print how to]
#   THAW_PREFIX              thaw's installation [/opt/thaw]: its venv/bin/python runs the installer
#   THAW_PYTHON              that Python instead [$THAW_PREFIX/venv/bin/python]
set -euo pipefail

say() { printf '[thaw containerd] %s\n' "$*"; }
die() { printf '[thaw containerd] ERROR: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
  "") ;;
  *) die "unknown option $1 (see --help)" ;;
esac

PY=${THAW_PYTHON:-${THAW_PREFIX:-/opt/thaw}/venv/bin/python}
[ -x "$PY" ] || die "thaw's virtualenv is missing ($PY): install thaw first with install/node.sh" \
  "(install/node.sh --containerd installs thaw and then runs this script)"
"$PY" -c 'import thaw.shim.containerd.install' 2>/dev/null || \
  die "$PY cannot import thaw.shim.containerd (thaw or tomlkit missing, or an older thaw): run install/node.sh again"

CTR=${CONTAINERD_BIN:-$(PATH="$PATH:/usr/local/bin:/usr/bin:/usr/sbin" command -v containerd || true)}
[ -n "$CTR" ] && [ -x "$CTR" ] || die "containerd is not installed (Debian: apt-get install containerd)"

args=(install --containerd "$CTR" --conf-d "${CONTAINERD_CONF_D:-/etc/containerd/conf.d}"
      --binary "${THAW_RUNTIME_BIN:-/usr/local/bin/thaw-runtime}")
[ -n "${CONTAINERD_CONFIG:-}" ] && args+=(--config "$CONTAINERD_CONFIG")

rc=0
# -I: no user site, no PYTHON* variables, not the current directory on sys.path
"$PY" -I -m thaw.shim.containerd "${args[@]}" || rc=$?
case $rc in
  0) say "nothing changed; containerd not restarted"; exit 0 ;;
  100) ;;  # files changed
  *) die "registering the thaw runtime handler failed (nothing was changed)" ;;
esac

containerd_pids() {
  local d
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = containerd ] && echo "${d#/proc/}"
  done
  return 0
}

if [ "${THAW_CONTAINERD_RESTART:-1}" = 0 ]; then
  say "not restarting containerd (THAW_CONTAINERD_RESTART=0): restart it to load the thaw handler"
elif [ -d /run/systemd/system ] && systemctl is-active --quiet containerd 2>/dev/null; then
  say "restarting containerd (systemctl restart containerd); running containers keep running"
  systemctl restart containerd || die "systemctl restart containerd failed: see journalctl -u containerd"
  say "containerd restarted: the runtime handler \"thaw\" is active"
elif [ -n "$(containerd_pids)" ]; then
  say "containerd is running, but not as the systemd unit containerd.service: restart it the way it" \
      "was started to load the thaw handler (for k3s/rke2: restart the k3s/rke2 service)"
else
  say "containerd is not running: it loads the thaw handler when it starts (systemctl start containerd)"
fi

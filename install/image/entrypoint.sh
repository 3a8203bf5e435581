#!/bin/bash
# The installer image's entrypoint (the DaemonSet's init container runs it privileged, with
# hostPID and the node's / at /host). Nothing here uses a package manager or the network.
#   thaw-installer install     copy this image's thaw version to the node and make it current;
#                              register the containerd handler; restart containerd
#   thaw-installer uninstall   [--purge]
#   thaw-installer sleep       what the DaemonSet's main container runs
# Optional inputs: /etc/thaw-config/config.yaml (a ConfigMap) replaces the node's
# /etc/thaw/config.yaml; files in /etc/thaw-registry (a Secret, e.g. auth.json) go to the node's
# /etc/thaw/ (root-only), for config.yaml's registry.auth_file.
set -euo pipefail
HOST=${THAW_HOST_ROOT:-/host}
B=/opt/thaw/$THAW_VERSION
# How to run a command in the node's namespaces (hostPID: its pid 1). Tests set another way in.
ENTER=${THAW_HOST_ENTER:-nsenter --target 1 --mount --uts --ipc --net --pid --}
say() { printf '[thaw-installer] %s\n' "$*"; }

case "${1:-install}" in
  install)
    [ -e "$HOST/etc/os-release" ] || { say "the node's / must be mounted at $HOST"; exit 1; }
    mkdir -p "$HOST/etc/thaw"
    if [ -f /etc/thaw-config/config.yaml ]; then
      cp /etc/thaw-config/config.yaml "$HOST/etc/thaw/config.yaml.thaw-new"
      mv "$HOST/etc/thaw/config.yaml.thaw-new" "$HOST/etc/thaw/config.yaml"
      say "config: /etc/thaw/config.yaml from the ConfigMap"
    fi
    if [ -d /etc/thaw-registry ]; then
      for f in /etc/thaw-registry/*; do
        [ -f "$f" ] || continue
        install -m 0600 "$f" "$HOST/etc/thaw/$(basename "$f")"
        say "registry credentials: /etc/thaw/$(basename "$f")"
      done
    fi
    # Copy this version onto the node, then install it in the node's own namespaces (the bundle
    # carries its interpreter and C library: it runs on any distribution). There `thaw doctor`
    # sees the node's mounts and containerd.sh can restart containerd with systemctl.
    "$B/share/thaw-node.sh" copy --root "$HOST"
    args=()
    if $ENTER /bin/sh -c 'PATH=$PATH:/usr/local/bin:/usr/bin:/usr/sbin; command -v containerd' >/dev/null 2>&1; then
      args+=(--containerd)
    else
      say "no containerd on this node: thaw installed, no runtime handler registered"
    fi
    $ENTER "$B/share/thaw-node.sh" install "${args[@]}"
    ;;
  uninstall) shift; exec $ENTER /opt/thaw/current/share/thaw-node.sh uninstall "$@" ;;
  sleep) exec sleep infinity ;;
  *) say "unknown command $1 (install, uninstall, sleep)"; exit 2 ;;
esac

#!/bin/bash
# For testing the installer image without a node: run "$@" with /host as the root of a new mount
# namespace, which is what `nsenter --target 1` gives the image's entrypoint on a real node
# (THAW_HOST_ENTER=/enter_root.sh). /proc, /sys, /dev of the container and a fresh /run.
exec unshare --mount --propagation private -- bash -c '
mount --bind /host /host && mount -t proc proc /host/proc && mount --rbind /sys /host/sys
mount --rbind /dev /host/dev && mount -t tmpfs -o mode=0755 tmpfs /host/run
cd /host && pivot_root . . && umount -l . && exec "$@"' enter_root "$@"

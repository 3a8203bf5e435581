"""containerd and the `thaw` runtime handler: find containerd's config, check the handler, write it.

The handler is a runtime entry of containerd's CRI plugin:

    runtime_type = "io.containerd.runc.v2"
    options.BinaryName = "/usr/local/bin/thaw-runtime"
    pod_annotations = container_annotations = ["thaw.dev/*"]

under `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw` in config version 2
(containerd 1.6/1.7) or `plugins."io.containerd.cri.v1.runtime".containerd.runtimes.thaw` in
version 3 (containerd 2.x). It lives in a drop-in file (`/etc/containerd/conf.d/99-thaw.toml`)
that the main config pulls in through `imports`.

  discovery  the containerd binary, its version and defaults, its main config, whether it runs
  merge      what containerd loads for a main config (imports) and how it merges it (1.x vs 2.x)
  goglob     Go's filepath.Match, which containerd applies to the annotation allow-lists
  dropin     the thaw runtime entry and the drop-in's content and text
  install    registering the handler: the drop-in, the main config's `imports`, checked, undone on error
  checks     what `thaw doctor` reports about the registration
  __main__   `python -m thaw.shim.containerd install|check` (run by install/containerd.sh)

The runtime never imports this package: it is for the installer and `thaw doctor`.
"""


from thaw.oci import ThawError


class ContainerdConfigError(ThawError):
    """containerd's configuration cannot be read or changed safely."""

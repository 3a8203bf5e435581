"""Drivers of outside programs: runc, CRIU (and its image files), the CUDA driver, an engine's
endpoints, rootfs diffs, processes, network checks. Uses oci/ and shim/'s root helpers only."""

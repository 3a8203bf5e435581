"""Whether what a restore brings back stays within the new spec: who each restored thread is and
what it may do, proven twice and never taken from the snapshot's own word (its config is only a
hint, checked earlier by fingerprint.py, and may only refuse). By what each part proves:

  grant.py              what the spec grants (Grant), an excess (Excess), the comparisons both
                        checks share (credentials, a seccomp filter against the profile's)
  image_check.py        before CRIU runs: every task and thread of the snapshot's images (the
                        facts the store keeps, criu_images.Images) against the grant
  mounts.py             before CRIU runs: the images' mount tree against the spec's (and which
                        masks only the restored rootfs can prove, looked up there)
  namespaces.py         before CRIU runs: what CRIU would write into namespaces (hostname, IPC
                        sysctls and objects), created or joined by path, against the spec
  kernel_check.py       after CRIU restored the tasks and left them stopped, before any of them
                        runs user code: every thread's /proc status and oldest seccomp filter
                        (ptrace) against the same grant; then resume() (SIGCONT)
  seccomp_reference.py  which filter the spec's profile installs on this node: recorded at
                        capture, or learnt once from a probe container that runs nothing

A thread may hold less than the spec grants, never more. Seccomp: the filter the spec's profile
installs must be the oldest of every thread's chain (filters added later only restrict).
"""

from .grant import CAP_BITS, CAP_SETGID, CAP_SETUID, ConfinementError, Grant
from .image_check import check_images
from .kernel_check import check_kernel, kernel_excess, resume, tree
from .mounts import rootfs_mask_excess, unproven_masks
from .namespaces import fresh_ipc_sysctls, spec_namespaces
from .seccomp_reference import probe_reference, profile_key, record_from_capture, reference

__all__ = ["CAP_BITS", "CAP_SETGID", "CAP_SETUID", "ConfinementError", "Grant", "check_images", "check_kernel",
           "fresh_ipc_sysctls", "kernel_excess", "probe_reference", "profile_key", "record_from_capture", "reference",
           "resume", "rootfs_mask_excess", "spec_namespaces", "tree", "unproven_masks"]

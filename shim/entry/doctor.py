"""`thaw doctor`: is this node able to capture and restore? Each check yields (ok, what, detail)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator

from thaw.oci.files import make_private_dir

from ..containerd.checks import doctor_checks
from ..drivers import criu, cuda
from ..drivers.runc import Runc
from ..lifecycle import recovery
from ..lifecycle.recovery import finish
from ..node.config import Config
from ..node.config_schema import ConfigError
from ..node.provenance import ProvenanceError, check_public_key, signing_key
from ..node.state import ContainerState, Phase
from ..node.store import Store

Check = tuple[bool, str, str]


def _owner_only(path: str) -> Check:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True, path, "absent (created root-only on first use)"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0 or mode & 0o077:
        return False, path, f"must be owned by root with mode 0700 (owner uid {st.st_uid}, mode {mode:04o})"
    return True, path, f"root-only ({mode:04o})"


def run_checks(cfg: Config, containerd: bool = True) -> Iterator[Check]:
    yield (os.geteuid() == 0, "root", "running as root" if os.geteuid() == 0 else "thaw needs root")
    yield True, "config", cfg.source or "defaults (no config file)"
    try:
        runtime = cfg.resolve_next_runtime()
        version = Runc(runtime, cfg.resolve_criu()).version()
        yield version != "unknown", "next_runtime", f"{runtime} ({version})"
    except ConfigError as exc:
        yield False, "next_runtime", str(exc)

    binary = cfg.resolve_criu()
    v = criu.version(binary)
    if v is None:
        yield False, "criu", f"{binary} not found or not runnable"
    else:
        yield criu.version_tuple(v) >= (4, 0), "criu version", f"{binary} {v} (need >= 4.0)"
        ok, detail = criu.check(binary)
        yield ok, "criu check", detail
        yield from _fast_restore(cfg, binary)
        yield from _network_lock(cfg, binary)
        stale = criu.stale_kdat_tmp()
        # A slower restore (~30 ms), not a broken node: reported, not failed.
        if not criu.run_is_tmpfs():
            kdat = "warning: /run is not a tmpfs: CRIU probes the kernel on every dump and restore"
        elif stale:
            kdat = (f"warning: {stale} left by a CRIU that died stops CRIU from caching its kernel probe "
                    "(every dump and restore probes again); thaw doctor --fix removes it")
        else:
            kdat = "/run is a tmpfs: CRIU keeps its kernel probe"
        yield True, "criu kdat cache", kdat

    ipt = shutil.which("iptables-restore", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    yield bool(ipt), "iptables-restore", ipt or "missing: CRIU's network lock needs it (apt install iptables)"
    ns_last_pid = os.path.exists("/proc/sys/kernel/ns_last_pid")
    yield ns_last_pid, "kernel checkpoint/restore", \
        "CONFIG_CHECKPOINT_RESTORE present" if ns_last_pid else "/proc/sys/kernel/ns_last_pid missing"
    if cfg.hook:
        # runc runs hooks with an empty environment: the hook must start from nothing.
        try:
            proc = subprocess.run([cfg.hook], env={}, capture_output=True, timeout=30)
            ok = proc.returncode == 2 and b"usage" in proc.stderr
            detail = cfg.hook if ok else f"{cfg.hook} does not start: {proc.stderr.decode(errors='replace')[-300:]}"
        except OSError as exc:
            ok, detail = False, f"{cfg.hook}: {exc}"
        yield ok, "thaw-hook", detail
    yield _owner_only(cfg.store_dir)
    if cfg.store.max_bytes and os.path.isdir(cfg.store_dir):
        yield _node_cache(cfg)
    yield _owner_only(cfg.state_dir)
    yield from _trust(cfg)

    if os.path.exists("/dev/nvidiactl"):
        yield cuda.available(), "cuda-python", "importable" if cuda.available() else \
            "missing: pip install cuda-bindings into thaw's virtualenv (install/node.sh does this on GPU nodes)"
        yield True, "nvidia driver", cuda.driver_version() or "unknown"
    else:
        yield True, "gpu", "no NVIDIA driver on this node: CPU-only snapshots"

    # containerd: is the runtime handler "thaw" registered (only where containerd is installed)?
    if containerd:
        yield from doctor_checks()


def _trust(cfg: Config) -> Iterator[Check]:
    """Every key trust.keys names must load (an unusable one is silently not trusted); the signing
    key, if any, must load and be root-only."""
    keys = sorted({p for paths in cfg.trust.keys.values() for p in paths})
    for path in keys:
        try:
            yield True, "trusted key", f"{path}: {check_public_key(path)}"
        except ProvenanceError as exc:
            yield False, "trusted key", str(exc)
    if not keys:
        yield True, "trust", ("no keys: only snapshots captured here are restored"
                              + (f" (and unsigned ones from {', '.join(cfg.trust.unsigned)})" if cfg.trust.unsigned else ""))
    if cfg.trust.signing_key:
        try:
            signing_key(cfg)
            mode = os.stat(cfg.trust.signing_key).st_mode & 0o077
            yield not mode, "signing key", cfg.trust.signing_key + (" readable by others: chmod 600" if mode else "")
        except (ProvenanceError, OSError) as exc:
            yield False, "signing key", str(exc)


def _network_lock(cfg: Config, binary: str) -> Iterator[Check]:
    lock = "network-lock nftables" in criu.dump_options(binary, make_private_dir(cfg.state_dir))
    yield True, "network lock", ("nftables, in-process (captures made here restore without iptables-restore)"
                                 if lock else "iptables (CRIU's default: an iptables-restore run per restore)")


def _node_cache(cfg: Config) -> Check:
    """Over store.max_bytes is reported, not failed: what could not be evicted is in use or
    exists nowhere else."""
    held, limit = Store(cfg.store_dir).total_bytes(), cfg.store.max_bytes
    state = ("warning: over it (thaw gc evicts what may go; thaw events says what may not)"
             if held > limit else "within it")
    return True, "node cache", f"{held} bytes of store.max_bytes {limit}: {state}"


def _fast_restore(cfg: Config, binary: str) -> Iterator[Check]:
    """Which page fill restores get here: thaw's CRIU options (patch 0002) or CRIU's stock one,
    and whether huge pages help on this machine (measured once, kept for `hugepages: auto`)."""
    have = criu.features(binary, make_private_dir(cfg.state_dir))
    if criu.PAGE_WORKERS not in have:
        yield True, "fast restore", (f"{binary} is a CRIU without thaw's page-fill patch: restores fill memory "
                                     "at stock speed (install/node.sh builds the patched one)")
        return
    probe = criu.read_thp_probe(cfg.state_dir)
    if probe is None and criu.thp_mode() == "madvise" and os.geteuid() == 0:
        try:
            probe = criu.measure_thp_fill(cfg.state_dir, cfg.state_dir)
        except OSError as exc:
            yield False, "fast restore", f"cannot measure the huge-page fill probe: {exc}"
    opts = criu.restore_options(cfg.restore.worker_count(), cfg.restore.hugepages, have, probe)
    measured = (f"; probe: {probe['small_gib_s']} GiB/s in 4 KiB pages, {probe['huge_gib_s']} GiB/s in huge pages"
                if probe else "")
    yield True, "fast restore", f"{' '.join(opts) or 'stock fill (restore.workers: 0)'} (THP {criu.thp_mode()}{measured})"


def fix(cfg: Config) -> list[str]:
    """`thaw doctor --fix`: clean up what dead thaw processes left. Restores whose thaw-runtime
    died (recovery), records of containers runc no longer has (deleted without their hooks),
    staging areas of dead captures and imports, and blobs and image directories no snapshot uses
    (store gc). Returns what it did, one line each."""
    done = []
    records_dir = os.path.join(cfg.state_dir, "containers")
    names = sorted(os.listdir(records_dir)) if os.path.isdir(records_dir) else []
    for name in names:
        if not name.endswith(".json"):
            continue
        cid = name[:-5]
        try:
            st = ContainerState(cfg.state_dir, cid)
        except ValueError:
            continue
        record = st.read()
        if record is None:
            st.remove()
            done.append(f"{cid}: unreadable record removed")
        elif recovery.stale(record):
            try:
                cleaned = recovery.recover(cfg, cid, record, "thaw doctor --fix")
            except recovery.RecoveryError as exc:
                done.append(f"{cid}: {exc}")
                continue
            done.append(f"{cid}: dead restore cleaned up ({', '.join(cleaned) or 'state only'})")
        elif record.phase != Phase.RESTORING:
            runc = Runc.with_root(cfg.resolve_next_runtime(), cfg.resolve_criu(), record.root)
            if runc.state(cid) is None:
                finish(cfg, cid, "doctor")
                done.append(f"{cid}: record of a container runc no longer has removed")
    stale = criu.stale_kdat_tmp()
    if stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
        done.append(f"{stale}: removed (CRIU caches its kernel probe again)")
    if os.path.isdir(cfg.store_dir):
        store = Store.for_config(cfg)
        before = _store_files(store.root)
        store.init().gc()
        freed = before - _store_files(store.root)
        if freed:
            done.append(f"store: {freed} leftover files of dead captures, imports or removed snapshots deleted")
    return done


def _store_files(root: str) -> int:
    return sum(len(files) for _d, _dirs, files in os.walk(root))

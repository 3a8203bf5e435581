# Source on the GPU machine from the repository root: puts the carried CRIU, runc and
# iptables-restore on PATH (with their libraries), installs the carried wheels into /tmp/site and
# writes a thaw config under /tmp/thaw. See bench/device/pack.sh for what .carry/ holds.
C=$PWD/.carry
B=/tmp/thawbin
mkdir -p "$B" /tmp/thaw
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lib exec %s/bin/criu "$@"\n' "$C" "$C" > "$B/criu"
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lib exec %s/bin/runc "$@"\n' "$C" "$C" > "$B/runc"
for t in iptables-restore ip6tables-restore iptables ip6tables; do
  printf '#!/bin/sh\nXTABLES_LIBDIR=%s/xtables LD_LIBRARY_PATH=%s/lib exec %s/bin/xtables-nft-multi %s "$@"\n' \
    "$C" "$C" "$C" "$t" > "$B/$t"
done
chmod +x "$B"/*
export PATH=$B:$PATH
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$C"/wheels/*.whl
export PYTHONPATH=/tmp/site
ln -sf /tmp/site/bin/thaw "$B/"
# Launchers like install/node.sh writes: runc runs hooks with an empty environment.
PY=$(command -v python3)
SITE=$(python3 -c 'import sysconfig as s; print(s.get_paths()["purelib"])')
for c in "thaw-runtime thaw.shim.entry.runtime" "thaw-hook thaw.hooks.main"; do
  set -- $c   # (the sourcing script's arguments are lost: session.sh saves them)
  printf '#!%s -IS\nimport sys\nsys.path[:0] = ["/tmp/site", "%s"]\nfrom %s import main\nmain()\n' "$PY" "$SITE" "$2" > "$B/$1"
  chmod +x "$B/$1"
done
if [ -n "${PROFILE_RUNTIME:-}" ]; then
  # Bench only: each thaw-runtime create under cProfile, its stats into /tmp/runtime-prof/ (where
  # the restore path's own start goes: imports, config, the create before the first phase).
  mkdir -p /tmp/runtime-prof
  cat > "$B/thaw-runtime" <<LAUNCHER
#!$PY -IS
import cProfile, os, sys, time
t0 = time.perf_counter()
sys.path[:0] = ["/tmp/site", "$SITE"]
prof = cProfile.Profile() if "create" in sys.argv else None
if prof:
    prof.enable()
try:
    from thaw.shim.entry.runtime import main
    main()
finally:
    if prof:
        prof.disable()
        prof.dump_stats(f"/tmp/runtime-prof/create.{os.getpid()}.{time.perf_counter() - t0:.4f}s")
LAUNCHER
fi
cat > /tmp/thaw/config.yaml <<CFG
store_dir: /var/tmp/thaw-store
state_dir: /run/thaw
next_runtime: $B/runc
criu: $B/criu
hook: $B/thaw-hook
CFG
export THAW_CONFIG=/tmp/thaw/config.yaml THAW_TEST_CRIU=$B/criu THAW_TEST_MEMZOO=$C/bin/memzoo

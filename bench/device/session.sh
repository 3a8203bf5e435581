#!/usr/bin/env bash
# One device call: what the GPU machine offers, the GPU tests, CRIU's page fill proven byte-exact
# and timed on its cores, then the end-to-end benchmark. Everything goes to $OUT (logs tee'd, so
# a call stopped at its limit still returns what it had).
#   bash bench/device/session.sh [gpu_e2e.py arguments...]
# Environment: SKIP_TESTS=1, SKIP_SPEED=1, PROFILE_RUNTIME=1 (thaw-runtime's creates under cProfile: $OUT/runtime-prof.tar), DISK_PROBE=1, HEAP_PROBE=1, SPEED_ARGS="--size-gib 8 --workers 4,8,16 --rounds 3",
#   LOADER_SWEEP="4,8,16:8,16,64" (bench/weights.py --sweep: the worker's loader per readers x chunk MiB, the fastest passed to it),
#   LIMITS=1 (bench/device/limits.py first, into $OUT/limits.json, handed to gpu_e2e.py),
#   CONFIGS="qwen3-0.6b:3 qwen3-8b:2" (gpu_e2e.py once per worker config and run count, each into
#   $OUT/CONFIG/; the restore logs of all of them in $OUT/restore-logs.tar; the .md and .png are
#   left out, to stay within the files a device call returns: `gpu_e2e.py --report-only` remakes them).
set -uo pipefail
cd "$(dirname "$0")/../.."
E2E_ARGS=("$@")   # env.sh sets positional parameters
LOADER_ARGS=()
# CRIU keeps its kernel-feature probe (kdat) in /run/criu.kdat only where /run is a tmpfs, as it
# is on real nodes but not on the GPU machine: give this session (and only it: a private mount
# namespace) a tmpfs /run with the host's entries bound back in, so the probe is not counted.
if [ -z "${THAW_RUN_TMPFS:-}" ] && [ "$(stat -f -c %T /run)" != tmpfs ]; then
  exec env THAW_RUN_TMPFS=1 unshare -m --propagation private bash "$0" "$@"
fi
if [ -n "${THAW_RUN_TMPFS:-}" ]; then
  mkdir -p /tmp/run.host && mount --bind /run /tmp/run.host && mount -t tmpfs -o mode=755 tmpfs /run
  for e in /tmp/run.host/* /tmp/run.host/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    n=/run/${e##*/}
    if [ -L "$e" ]; then cp -P "$e" "$n"; continue; fi
    if [ -d "$e" ]; then mkdir -p "$n"; else : > "$n"; fi
    mount --bind "$e" "$n" || echo "warning: /run/${e##*/} not carried into the tmpfs /run"
  done
fi
export PYTHONUNBUFFERED=1
source bench/device/env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash bench/device/probe.sh > "$OUT/probe.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_criu_page_restore.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -5
fi
if [ -z "${SKIP_SPEED:-}" ]; then
  mkdir -p /var/tmp/speed
  timeout 200 python3 bench/restore_speed.py ${SPEED_ARGS:---size-gib 8 --workers 4,8,16 --rounds 3} \
    --dir /var/tmp/speed 2>&1 | tee "$OUT/restore-speed.log" | tail -15
  cp bench/results/restore_speed-latest.json "$OUT/restore-speed.json" 2>/dev/null
  rm -rf /var/tmp/speed
fi
if [ -n "${DISK_PROBE:-}" ]; then    # the disk under a cold-cache restore
  bash bench/device/disk_probe.sh /var/tmp 4 2>&1 | tee "$OUT/disk-probe.txt"
fi
if [ -n "${HEAP_PROBE:-}" ]; then    # where the worker's heap comes from
  { python3 examples/inference-server/server.py --init-weights-only --config qwen3-0.6b --weights /var/tmp/w.st >/dev/null
    python3 bench/device/heap_probe.py /var/tmp/w.st; rm -f /var/tmp/w.st; } 2>&1 | tee "$OUT/heap-probe.txt"
fi
{ uname -r; df -h / /var/tmp /tmp; grep -E 'MemTotal|MemAvailable' /proc/meminfo; } 2>&1 | tee -a "$OUT/gpu-e2e.log"
if [ -n "${LIMITS:-}" ]; then    # the machine's own limits, before anything fills its page cache
  timeout 150 python3 bench/device/limits.py --out "$OUT/limits.json" --dir /var/tmp --fill-gib 6 2>&1 | tee -a "$OUT/gpu-e2e.log"
  E2E_ARGS+=(--limits "$OUT/limits.json")
fi
if [ -n "${LOADER_SWEEP:-}" ]; then   # e.g. "4,8,16:8,16,64": the worker's loader timed per readers x chunk MiB here; the fastest goes to the worker
  timeout 240 python3 bench/weights.py --sweep "$LOADER_SWEEP" --sizes 4096 --runs 3 --device cuda \
    --json "$OUT/loader-sweep.json" 2>&1 | tee -a "$OUT/gpu-e2e.log"
  read -r streams chunk < <(python3 -c 'import json, sys; b = json.load(open(sys.argv[1]))["best"]; print(b["streams"], b["chunk_mib"])' "$OUT/loader-sweep.json" 2>/dev/null)
  [ -n "${chunk:-}" ] && LOADER_ARGS=("--server-arg=--load-streams=$streams" "--server-arg=--load-chunk-mib=$chunk")
fi
if [ -z "${CONFIGS:-}" ]; then
  python3 bench/gpu_e2e.py --out "$OUT" "${E2E_ARGS[@]}" 2>&1 | tee -a "$OUT/gpu-e2e.log"
  exit
fi
mkdir -p /var/tmp/gpu-e2e /tmp/restore-logs
# CONFIG:RUNS; the config "transformers" is examples/transformers-worker (hot cache only);
# CONFIG-outside: the same config with its weights outside the snapshot (--weights-outside)
for c in $CONFIGS; do
  extra=(); name=${c%%:*}; config=${name%-outside}
  if [ "$config" = transformers ]; then extra=(--worker examples/transformers-worker/worker.py --no-cold-cache)
  else extra=("${LOADER_ARGS[@]}"); fi
  [ "$config" != "$name" ] && extra+=(--weights-outside)
  mkdir -p "$OUT/$name"
  GPU_E2E_TMP=/var/tmp/gpu-e2e python3 bench/gpu_e2e.py --out "$OUT/$name" --config "$config" --runs "${c##*:}" \
    "${E2E_ARGS[@]}" "${extra[@]}" 2>&1 | tee -a "$OUT/gpu-e2e.log"
  rm -f "$OUT/$name/gpu-e2e.md" "$OUT/$name/gpu-e2e.png"   # remade here: --report-only
  mv "$OUT/$name/restore-logs.tar.gz" "/tmp/restore-logs/$name.tar.gz" 2>/dev/null
  tar -cf "$OUT/restore-logs.tar" -C /tmp restore-logs
  df -h /var/tmp | sed 1d
done
if [ -n "${PROFILE_RUNTIME:-}" ]; then tar -cf "$OUT/runtime-prof.tar" -C /tmp runtime-prof; fi

#!/usr/bin/env bash
# CRIU's own zdtm memory tests, restoring with thaw's page-restore options (patch 0002).
# Not part of CI: it builds CRIU and the tests it runs, and takes several minutes.
#
#   bench/zdtm_page_restore.sh [WORKDIR]
#   ZDTM_TESTS="zdtm/static/pthread02 ..." ZDTM_MODES="stock patched" bench/zdtm_page_restore.sh [WORKDIR]
#
# Builds CRIU 4.1.1 + install/criu-patches in WORKDIR (default /tmp/thaw-zdtm), then runs each
# test below once per flavour, every restore with --page-restore-workers 4
# --page-restore-hugepages and CRIU_FAULT=139 (every restored process starts all its helpers,
# however little memory it has), and the dedup set once more with --dedup (auto-dedup: the
# workers must step aside). Results: WORKDIR/zdtm-results.txt.
#
# ZDTM_TESTS runs only the tests named (in every flavour, no --dedup pass). ZDTM_MODES lists how
# each test is restored: "patched" (the default, as above) and/or "stock" (the same build with
# no --page-restore-* option and no CRIU_FAULT: CRIU's own page fill), to tell a failure of this
# machine from one of the patch. With a mode other than the default, each result line starts
# with it.
#
# One local change to zdtm.py: tests run as root, not as zdtm's test uid. CRIU reads a task's
# rlimits with prlimit(), which for another uid needs CAP_SYS_RESOURCE, and this sandbox has none
# ("Can't get rlimit 0: Operation not permitted" at dump).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-/tmp/thaw-zdtm}
TARBALL=${THAW_BUILD_CACHE:-/var/cache/thaw}/criu_4.1.1.orig.tar.xz
FLAVOURS=${ZDTM_FLAVOURS:-h ns}
STATIC="maps00 maps01 maps02 maps03 maps04 maps05 maps06 maps09 maps10 maps_file_prot mem-touch
  thp_disable shm shm-unaligned shm-mp shmemfd shmemfd-priv memfd00 memfd01 memfd02 memfd03 memfd04
  memfd05 mprotect00 cow00 cow01 grow_map grow_map02 grow_map03 mlock_setuid
  unlink_mmap00 unlink_mmap01 unlink_mmap02 mtime_mmap pthread00 pthread01 pthread02 vfork00
  sigaltstack remap_dead_pid"
TRANSITION="maps007 maps008 fork fork2 thread-bomb shmem stack"
DEDUP="maps00 maps04 mem-touch cow01"
TESTS=${ZDTM_TESTS:-}
MODES=${ZDTM_MODES:-patched}

export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH      # Debian's python3 with protobuf and yaml
TREE="$WORK/criu-4.1.1"
if [ ! -x "$TREE/criu/criu" ]; then
  rm -rf "$TREE" && mkdir -p "$TREE"
  tar -xJf "$TARBALL" -C "$TREE" --strip-components=1
  for p in "$SRC"/install/criu-patches/*.patch; do patch -d "$TREE" -p1 -s < "$p"; done
  make -C "$TREE" -j"$(nproc)" criu > "$WORK/build.log" 2>&1
  make -C "$TREE" lib >> "$WORK/build.log" 2>&1
  make -C "$TREE/test/zdtm/lib" >> "$WORK/build.log" 2>&1
  sed -i "s/        if not test_flag(self.__desc, 'suid'):/        if False:  # thaw: run as root/" \
    "$TREE/test/zdtm.py"
fi

WRAPPER="$WORK/criu-page-fill"
cat > "$WRAPPER" <<EOF
#!/bin/sh
if [ "\$1" = restore ]; then
  shift
  CRIU_FAULT=139 exec "$TREE/criu/criu" restore --page-restore-workers 4 --page-restore-hugepages "\$@"
fi
exec "$TREE/criu/criu" "\$@"
EOF
chmod +x "$WRAPPER"

RESULTS="$WORK/zdtm-results.txt"
: > "$RESULTS"
run() {  # $1 = flavour, $2 = test, rest = zdtm options; $mode: stock or patched
  local f=$1 t=$2 out bin=$WRAPPER tag="" logname
  shift 2
  if [ "$mode" = stock ]; then bin=$TREE/criu/criu; fi
  if [ "$MODES" != patched ]; then tag="$mode "; fi
  out=$(cd "$TREE/test" && timeout 600 python3 zdtm.py run -f "$f" -t "$t" --criu-bin "$bin" \
          --keep-img always "$@" 2>&1) || true
  local verdict
  if grep -q "Test $t PASS" <<<"$out"; then verdict=PASS
  elif grep -qi "skip" <<<"$out" && ! grep -q "FAIL" <<<"$out"; then verdict=SKIP
  else verdict=FAIL; fi
  local fills
  fills=$(find "$TREE/test/dump/$t" -name 'restore.log' -newer "$RESULTS" -exec grep -h "page fill: [0-9]" {} + 2>/dev/null \
          | sed -n 's/.*page fill: \([0-9]*\) KiB, \([0-9]*\) workers.*/\2/p' | sort | uniq -c | tr -s ' \n' ' ' || true)
  echo "$tag$verdict $f $t $* workers(count x n):${fills:- none}" | tee -a "$RESULTS"
  logname=$(echo "$t-$f" | tr / _)
  if [ -n "$tag" ]; then logname="$logname-$mode"; fi
  if [ "$verdict" = FAIL ]; then echo "$out" | tail -60 > "$WORK/$logname.fail.log"; fi
  return 0
}
for f in $FLAVOURS; do
  for mode in $MODES; do
    if [ -n "$TESTS" ]; then
      for t in $TESTS; do run "$f" "$t"; done
      continue
    fi
    for t in $STATIC; do run "$f" "zdtm/static/$t"; done
    for t in $TRANSITION; do run "$f" "zdtm/transition/$t"; done
    for t in $DEDUP; do run "$f" "zdtm/static/$t" --dedup; done
  done
done
count() { grep -cE "^(stock |patched )?$1 " "$RESULTS" || true; }
echo "== $(count PASS) passed, $(count FAIL) failed, $(count SKIP) skipped"

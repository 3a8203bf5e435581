#!/usr/bin/env bash
# How fast this machine's disk gives back a file that is not in the page cache: one reader, and
# eight readers on eighths of it (what CRIU's page-fill workers do). The floor under any restore
# with a cold page cache. Prints GiB/s.   bash bench/device/disk_probe.sh [DIR] [GIB]
set -euo pipefail
f=${1:-/var/tmp}/disk-probe.$$; gib=${2:-4}; n=$((gib * 128))   # 8 MiB blocks
head -c $((gib << 30)) /dev/urandom > "$f"; sync
rate() { python3 -c "print(f'{$gib / ($2 - $1):.2f}')"; }
echo 3 > /proc/sys/vm/drop_caches; t0=$(date +%s.%N)
dd if="$f" of=/dev/null bs=8M status=none; t1=$(date +%s.%N)
echo "disk read, 1 reader:  $(rate "$t0" "$t1") GiB/s"
echo 3 > /proc/sys/vm/drop_caches; t0=$(date +%s.%N)
for i in 0 1 2 3 4 5 6 7; do dd if="$f" of=/dev/null bs=8M skip=$((i * n / 8)) count=$((n / 8)) status=none & done; wait
t1=$(date +%s.%N)
echo "disk read, 8 readers: $(rate "$t0" "$t1") GiB/s"
t0=$(date +%s.%N); dd if="$f" of=/dev/null bs=8M status=none; t1=$(date +%s.%N)
echo "page cache read, 1 reader: $(rate "$t0" "$t1") GiB/s"
rm -f "$f"

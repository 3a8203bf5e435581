#!/usr/bin/env bash
# Build thaw-runtime's C front (install/runtime-front.c) into OUT, atomically.
#
#   install/runtime-front.sh OUT PYTHON_ENTRY [EXTRA_PATH]
#
# PYTHON_ENTRY: the Python thaw-runtime launcher it hands every call it does not pass through;
# EXTRA_PATH: appended to PATH for the next runtime (the bundle's sbin, as its launchers do).
# Static: no loader or C library to carry or resolve at every call (the bundle needs no patchelf
# for it), and the fastest start. Called by install/node.sh and install/bundle.sh; tests build
# variants of it with their own PYTHON_ENTRY.
set -euo pipefail
out=$1 entry=$2 extra=${3:-}
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/runtime-front.c
for v in "$entry" "$extra"; do
  # They become C string literals: plain path characters only.
  case "$v" in *[!A-Za-z0-9/._+-]*) echo "runtime-front.sh: path '$v': letters, digits and / . _ + - only" >&2; exit 2 ;; esac
done
case "$entry" in /*) ;; *) echo "runtime-front.sh: PYTHON_ENTRY must be absolute" >&2; exit 2 ;; esac
tmp=$(mktemp "$(dirname "$out")/.thaw-runtime-front.XXXXXX")
trap 'rm -f "$tmp"' EXIT
${CC:-gcc} -std=gnu11 -O2 -static -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong \
  -ffile-prefix-map="$(dirname "$src")"=. \
  -DTHAW_PYTHON_ENTRY="\"$entry\"" -DTHAW_EXTRA_PATH="\"$extra\"" -o "$tmp" "$src"
strip "$tmp"
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT

#!/usr/bin/env bash
# Gather what the GPU machine lacks into .carry/ (git-ignored), for the device tool's `carry`:
# CRIU (as install/node.sh built it) and runc with their shared libraries, iptables-restore
# (xtables-nft-multi, its libraries and extensions: CRIU's network lock needs it), and wheels of
# thaw and of the Python packages the device image does not have (fastsafetensors: the example
# worker's --loader fastsafetensors; its typer dependency is its CLI's only, so --no-deps suffices).
set -euo pipefail
cd "$(dirname "$0")/../.."
C=.carry
rm -rf "$C" && mkdir -p "$C/bin" "$C/lib" "$C/wheels"
libs() { ldd "$1" | awk '$3 ~ /^\// {print $3}' | grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' || true; }
for b in /usr/local/sbin/criu "$(command -v runc)" /usr/sbin/xtables-nft-multi; do
  cp -L "$b" "$C/bin/"
  for l in $(libs "$b"); do cp -Ln "$l" "$C/lib/" 2>/dev/null || true; done
done
# memzoo as the tests build it (dynamic: glibc 2.36 here runs on 2.39 there), for a machine without gcc
gcc -O2 -Wall -pthread -o "$C/bin/memzoo" tests/workloads/memzoo.c
cp -rL /usr/lib/x86_64-linux-gnu/xtables "$C/xtables"
for l in $(for f in "$C"/xtables/*.so; do libs "$f"; done | sort -u); do cp -Ln "$l" "$C/lib/" 2>/dev/null || true; done
# thaw's wheel with CRIU's image classes (a build product, never committed), made as node.sh makes
# them from the CRIU source it verified and built.
T=$(mktemp -d)
cp -a pyproject.toml README.md oci shim hooks "$T/"
bash install/criu-protos.sh "$T" "${THAW_BUILD_CACHE:-/var/cache/thaw}/criu_$(sed -n 's/^CRIU_VERSION=//p' install/node.sh).orig.tar.xz"
/opt/thaw/venv/bin/pip wheel -q --no-deps -w "$C/wheels" "$T" 2>&1 | grep -v "is ignored" || true
rm -rf "$T"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$C/wheels" pyroute2 tomlkit fastsafetensors \
  "protobuf==$(/opt/thaw/venv/bin/python -c 'import google.protobuf as p; print(p.__version__)')" 2>&1 | grep -v "is ignored" || true
du -sh "$C"; ls "$C/bin" "$C/wheels"

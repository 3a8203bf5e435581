#!/usr/bin/env bash
# Build thaw's node bundle: one versioned tarball with everything a node runs, nothing to fetch
# or compile there. Run on the development machine (Debian 12, root, after install/node.sh).
#
#   install/bundle.sh build [OUT_DIR]   -> OUT_DIR/thaw-node-<version>.tar.gz (default dist/)
#   install/bundle.sh version           the version a build here gets
#
# What it holds, under the fixed prefix /opt/thaw/<version> (a node unpacks it there):
#   lib/          this machine's glibc (ld-linux, libc, libm...) and every shared library below
#   python/       this machine's CPython 3.11 (interpreter, stdlib, lib-dynload) and, in
#                 python/lib/python3/dist-packages, thaw[gpu] + cryptography and their deps
#   sbin/         runc, the patched CRIU (THAW_CRIU_DIR, as install/node.sh built it),
#                 xtables-{nft,legacy}-multi and an iptables-restore that picks the host's backend
#   bin/          thaw, thaw-hook launchers, thaw-runtime's static C front (its Python fallback
#                 in libexec/);  share/  config.yaml, the installer
# Every ELF executable gets patchelf'd: its interpreter is the bundle's ld-linux and its RPATH the
# bundle's lib/, so the host's C library never matters (Debian 11's glibc 2.31 runs it, as does any
# newer one). Bytecode is compiled ahead (unchecked-hash .pyc: no source stat at start, and the
# same bytes every build). The tarball is reproducible: sorted, owner 0, mtime SOURCE_DATE_EPOCH
# (the commit's time), gzip -n.
#
# Environment: THAW_BUNDLE_VERSION (default <pyproject version>+g<commit>, "-dirty" when the tree
# has changes), THAW_CRIU_DIR (where node.sh put the patched CRIU, default /usr/local/sbin),
# THAW_BUNDLE_WORK (scratch, default /var/tmp/thaw-bundle).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '[thaw bundle] %s\n' "$*" >&2; }
die() { printf '[thaw bundle] ERROR: %s\n' "$*" >&2; exit 1; }

PY_VERSION=3.11
PY=/usr/bin/python$PY_VERSION
CRIU_DIR=${THAW_CRIU_DIR:-/usr/local/sbin}
WORK=${THAW_BUNDLE_WORK:-/var/tmp/thaw-bundle}

version() {
  local v rev dirty=""
  v=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -n1)
  rev=$(git -C "$SRC" rev-parse --short=10 HEAD 2>/dev/null || echo unknown)
  [ -z "$(git -C "$SRC" status --porcelain -- oci shim hooks install pyproject.toml 2>/dev/null)" ] || dirty=-dirty
  echo "${THAW_BUNDLE_VERSION:-$v+g$rev$dirty}"
}

# Shared libraries an ELF file needs, resolved on this machine (the loader itself excluded).
needed_libs() { ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'; }

build() {
  local out=${1:-$SRC/dist} v p stage epoch f
  [ "$(id -u)" = 0 ] || die "must run as root (reads the patched CRIU, owns the staged tree as root)"
  for t in patchelf "$PY" runc "$CRIU_DIR/criu" /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi; do
    command -v "$t" >/dev/null || die "$t missing (apt-get install patchelf runc iptables python3; install/node.sh builds CRIU)"
  done
  [ -f "$CRIU_DIR/criu.thaw-build" ] || die "$CRIU_DIR/criu was not built by install/node.sh (no criu.thaw-build stamp)"
  v=$(version)
  case "$v" in *[!A-Za-z0-9.+_-]*) die "version '$v': letters, digits and . + _ - only" ;; esac
  p=/opt/thaw/$v
  epoch=${SOURCE_DATE_EPOCH:-$(git -C "$SRC" log -1 --format=%ct 2>/dev/null || echo 0)}
  # Staged at a fixed path: pip writes absolute paths nowhere we keep, but a fixed path keeps any
  # stray build path identical between builds.
  stage=$WORK/root$p
  rm -rf "$WORK" && mkdir -p "$stage"/{lib,bin,sbin,share,python/bin} "$out"
  say "building thaw $v (prefix $p)"

  # --- Python: this machine's interpreter and stdlib ---------------------------------------------
  cp -L "$PY" "$stage/python/bin/python$PY_VERSION"
  ln -s "python$PY_VERSION" "$stage/python/bin/python3"
  local stdlib=$stage/python/lib/python$PY_VERSION
  mkdir -p "$stdlib"
  # Not carried: tests, GUI, build-time and packaging tools, Debian's dist-packages hooks.
  (cd "/usr/lib/python$PY_VERSION" && find . \( -name __pycache__ -o -name test -o -name tests \
      -o -name idlelib -o -name tkinter -o -name turtledemo -o -name ensurepip -o -name lib2to3 \
      -o -name 'config-*' -o -name distutils -o -name EXTERNALLY-MANAGED -o -name dist-packages \
      -o -name site-packages \) -prune -o ! -type d -print0 | tar --null -T - -cf - | tar -xf - -C "$stdlib")

  # --- thaw and its Python dependencies ----------------------------------------------------------
  # A throw-away venv of the same interpreter runs pip; --target puts everything in site-packages.
  # Debian's site.py adds <prefix>/lib/python3/dist-packages (not site-packages): there, `python3 -I`
  # finds thaw too (install/containerd.sh runs it so); the launchers add it themselves (-S).
  local site=$stage/python/lib/python3/dist-packages wheel_dir=$WORK/wheels build_src=$WORK/src
  "$PY" -m venv "$WORK/pip-venv" >/dev/null || die "python3 -m venv failed (apt-get install python3-venv)"
  mkdir -p "$wheel_dir" "$build_src"
  cp -a "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/oci" "$SRC/shim" "$SRC/hooks" "$build_src/"
  find "$build_src" -name __pycache__ -prune -exec rm -rf {} +
  criu_protos "$build_src"
  "$WORK/pip-venv/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$wheel_dir" "$build_src" 2>&1 \
    | grep -v "is ignored: it is neither" || true
  # cryptography: the provenance checks' signatures; cuda-bindings: the gpu extra.
  "$WORK/pip-venv/bin/pip" install -q --disable-pip-version-check --no-compile --target "$site" \
    "$(echo "$wheel_dir"/thaw-*.whl)[gpu]" cryptography 2>&1 | grep -v "is ignored: it is neither" || true
  [ -d "$site/thaw/shim" ] || die "pip install of thaw into the bundle failed"
  rm -rf "$site/bin"   # console scripts with this build's paths: the bundle writes its own launchers
  # pip records an installer and a direct_url with the build path: not part of what runs.
  find "$site" -name direct_url.json -delete
  find "$site" -name RECORD -delete

  # --- runc, CRIU, iptables ----------------------------------------------------------------------
  cp -L "$(command -v runc)" "$stage/sbin/runc"
  cp -L "$CRIU_DIR/criu" "$stage/sbin/criu"
  cp "$CRIU_DIR/criu.thaw-build" "$stage/share/criu.thaw-build"
  cp -L /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi "$stage/sbin/"
  cp -rL /usr/lib/x86_64-linux-gnu/xtables "$stage/lib/xtables"
  for cmd in iptables-restore iptables ip6tables-restore ip6tables; do
    cat > "$stage/sbin/$cmd" <<EOF
#!/bin/sh
# CRIU's network lock runs $cmd when it cannot lock in-process (nftables): use the backend the
# host's kernel already has tables in (legacy when ip_tables holds any, else nft).
if [ -s /proc/net/ip_tables_names ]; then multi=xtables-legacy-multi; else multi=xtables-nft-multi; fi
XTABLES_LIBDIR=$p/lib/xtables exec $p/sbin/\$multi $cmd "\$@"
EOF
    chmod 0755 "$stage/sbin/$cmd"
  done

  # --- glibc and every shared library, then patchelf ---------------------------------------------
  local elves=() libs
  while IFS= read -r -d '' f; do
    head -c4 "$f" | grep -q $'\x7fELF' && elves+=("$f")
  done < <(find "$stage" -type f -print0 | sort -z)
  libs=$(for f in "${elves[@]}"; do needed_libs "$f"; done | sort -u)
  for f in $libs; do
    # Wheels carry their own libraries (RUNPATH $ORIGIN/...): those resolve inside site-packages.
    case "$f" in "$stage"/*) continue ;; esac
    cp -Ln "$f" "$stage/lib/"
  done
  # Libraries of libraries (ldd already lists the whole closure); the loader and libc as a pair.
  cp -L /lib64/ld-linux-x86-64.so.2 "$stage/lib/ld-linux-x86-64.so.2"
  for f in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libresolv.so.2 libutil.so.1; do
    [ -e "/lib/x86_64-linux-gnu/$f" ] && cp -Ln "/lib/x86_64-linux-gnu/$f" "$stage/lib/"
  done
  for f in "$stage/python/bin/python$PY_VERSION" "$stage"/sbin/{runc,criu,xtables-nft-multi,xtables-legacy-multi}; do
    patchelf --set-interpreter "$p/lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$p/lib" "$f"
  done
  # Libraries loaded by the interpreter's extension modules and by the bundle's libraries find
  # each other through the executable's RPATH (DT_RPATH applies to the whole load).
  check_closure "$stage" "$p"

  # --- launchers, config, installer --------------------------------------------------------------
  write_launcher "$stage" "$p" thaw thaw.shim.entry.cli
  # thaw-runtime is the static C front (install/runtime-front.c, built here: nodes need no
  # compiler); its Python fallback lives in libexec/, and it appends sbin to PATH as the launchers do.
  write_launcher "$stage" "$p" thaw-runtime thaw.shim.entry.runtime
  mkdir -p "$stage/libexec"
  mv "$stage/bin/thaw-runtime" "$stage/libexec/thaw-runtime-python"
  bash "$SRC/install/runtime-front.sh" "$stage/bin/thaw-runtime" "$p/libexec/thaw-runtime-python" "$p/sbin" \
    || die "building thaw-runtime's front failed (apt-get install build-essential)"
  write_launcher "$stage" "$p" thaw-hook thaw.hooks.main
  install -m 0644 "$SRC/install/config.yaml" "$stage/share/config.yaml"
  install -m 0755 "$SRC/install/thaw-node.sh" "$stage/share/thaw-node.sh"
  install -m 0755 "$SRC/install/containerd.sh" "$stage/share/containerd.sh"
  echo "$v" > "$stage/share/VERSION"

  # Ahead-of-time bytecode, unchecked-hash: the same bytes every build, and no stat of the source.
  # (this machine's identical interpreter: the staged one only runs from its final prefix)
  "$PY" -I -m compileall -q -j1 --invalidation-mode unchecked-hash \
    -s "$stage" -p / "$stdlib" "$site" >/dev/null || die "compileall failed"
  "$stage/lib/ld-linux-x86-64.so.2" --library-path "$stage/lib" "$stage/python/bin/python$PY_VERSION" -IS -c "import sys; sys.path.append('$site'); import thaw.shim.entry.runtime, thaw.shim.entry.cli, thaw.hooks.main, cryptography, cuda.bindings, importlib.util as u; u.find_spec('thaw.shim.drivers.criu_decode') is None or __import__('thaw.shim.drivers.criu_decode').shim.drivers.criu_decode.schemas()" \
    || die "the bundled interpreter cannot import thaw"

  local tarball=$out/thaw-node-$v.tar.gz
  tar -C "$WORK/root" --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
      -cf - "opt/thaw/$v" | gzip -9n > "$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
  rm -rf "$WORK"
  say "wrote $tarball ($(du -h "$tarball" | cut -f1), $(sha256sum "$tarball" | cut -c1-16))"
  echo "$tarball"
}

# CRIU's image schemas (thaw.shim.drivers.criu_proto), by install/criu-protos.sh as install/node.sh makes
# them, from the CRIU source node.sh verified and built (its cache).
criu_protos() {
  local src=$1 ver sum tarball
  [ -d "$src/shim/drivers/criu_proto" ] || return 0     # a tree from before the schemas
  ver=$(sed -n 's/^CRIU_VERSION=//p' "$SRC/install/node.sh")
  sum=$(sed -n 's/^CRIU_SHA256=//p' "$SRC/install/node.sh")
  tarball=${THAW_BUILD_CACHE:-/var/cache/thaw}/criu_${ver}.orig.tar.xz
  echo "$sum  $tarball" | sha256sum -c --status 2>/dev/null \
    || die "$tarball missing or not CRIU $ver's (install/node.sh fetches and verifies it)"
  bash "$SRC/install/criu-protos.sh" "$src" "$tarball" || die "CRIU's image schemas: protoc failed"
}

# Every NEEDED of every ELF in the bundle resolves inside it (site-packages' own libraries aside).
check_closure() {
  local stage=$1 p=$2 f n missing=""
  local have
  have=$(ls "$stage/lib")
  while IFS= read -r -d '' f; do
    head -c4 "$f" | grep -q $'\x7fELF' || continue
    case "$f" in "$stage/python/lib/python3/dist-packages/"*) continue ;; esac
    for n in $(patchelf --print-needed "$f" 2>/dev/null); do
      grep -qx "$n" <<<"$have" || missing+=" ${f#"$stage"}:$n"
    done
  done < <(find "$stage" -type f -print0)
  [ -z "$missing" ] || die "libraries missing from the bundle:$missing"
}

write_launcher() {  # stage prefix command module
  local stage=$1 p=$2 cmd=$3 mod=$4
  # -I -S: no site processing, no environment influence (as install/node.sh's launchers). The
  # bundle's sbin goes last on PATH: CRIU's iptables-restore where the host has none.
  cat > "$stage/bin/$cmd" <<EOF
#!$p/python/bin/python$PY_VERSION -IS
# thaw launcher written by install/bundle.sh
import os, sys
sys.path.append('$p/python/lib/python3/dist-packages')
os.environ['PATH'] = os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin') + ':$p/sbin'
from $mod import main
main()
EOF
  chmod 0755 "$stage/bin/$cmd"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  version) version ;;
  *) sed -n '2,25p' "$0"; exit 2 ;;
esac

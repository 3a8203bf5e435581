#!/usr/bin/env bash
# thaw node installer: runc, iptables, CRIU >= 4.0, thaw in its own virtualenv, default config.
# Idempotent and quick when re-run: it only installs what is missing.
#
#   install/node.sh              install thaw on this node
#   install/node.sh --dev        also install test dependencies (what the tests and benches use),
#                                among them the containerd builds the tests run (1.7, 2.x; see below)
#   install/node.sh --containerd also register the "thaw" runtime handler with containerd
#
# Environment: THAW_PREFIX (virtualenv and stamps, default /opt/thaw), THAW_BIN_DIR (where
# thaw, thaw-runtime and thaw-hook go, default /usr/local/bin), THAW_BUILD_CACHE (CRIU source
# and build, the test containerds; default /var/cache/thaw), THAW_CRIU_DIR (where the patched
# CRIU goes, default /usr/local/sbin).
set -euo pipefail

CRIU_VERSION=4.1.1
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
PREFIX=${THAW_PREFIX:-/opt/thaw}
# Where the commands go (a second, private installation for development sets both).
BIN_DIR=${THAW_BIN_DIR:-/usr/local/bin}
CACHE=${THAW_BUILD_CACHE:-/var/cache/thaw}
CRIU_DIR=${THAW_CRIU_DIR:-/usr/local/sbin}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DEV=0
CONTAINERD=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --containerd) CONTAINERD=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "node.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { printf '[thaw install] %s\n' "$*"; }
die() { printf '[thaw install] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ -r /etc/os-release ] && . /etc/os-release
command -v apt-get >/dev/null || die "apt-get not found: this installer supports Debian/Ubuntu"

# --- apt packages -------------------------------------------------------------------------------
PKGS=(runc iptables iproute2 busybox-static python3 python3-venv ca-certificates xz-utils
      build-essential patch pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
      protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev
      libgnutls28-dev libnftables-dev uuid-dev)
if [ "$DEV" = 1 ]; then
  PKGS+=(containerd containernetworking-plugins)   # the tests start a private containerd
  PKGS+=(procps)   # the tests read the process table (ps, pgrep); a minimal Debian 12 lacks it
  # Registry tests: a real registry (CNCF distribution 2.8), a second OCI client, htpasswd, a CA.
  PKGS+=(docker-registry skopeo apache2-utils openssl)
  # The node bundle (install/bundle.sh, tests/test_bundle.py): patchelf, and mmdebstrap for the roots.
  PKGS+=(patchelf mmdebstrap)
elif [ "$CONTAINERD" = 1 ] && ! command -v containerd >/dev/null; then
  PKGS+=(containerd containernetworking-plugins)   # never replace a containerd the node already runs
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed: ${missing[*]}"
else
  say "apt: all ${#PKGS[@]} packages present"
fi
if [ "$DEV" = 1 ] && command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true   # the tests start their own registries
fi

# --- packages of other Debian releases, privately -----------------------------------------------
# CRIU's source (trixie) and the test containerds (trixie, sid) come from Debian releases newer than
# this node's. They are fetched through a private apt configuration (its own sources list, lists
# and cache in a temporary directory) naming the mirror this machine already uses, so the system's
# apt sources, lists and packages stay untouched.
private_apt() {  # private_apt WHAT "deb|deb-src SUITE"...: sets APTDIR, APTOPTS, APT_MIRROR; runs update
  local what=$1 line
  shift
  APT_MIRROR=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources; grep -hs '^deb ' /etc/apt/sources.list | awk '{print "URIs: "$2}') \
                | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  [ -n "$APT_MIRROR" ] || die "$what: no Debian mirror found in the apt sources"
  APTDIR=$(mktemp -d)
  mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
  for line in "$@"; do
    echo "${line%% *} [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $APT_MIRROR ${line#* } main"
  done > "$APTDIR/sources.list"
  # Signatures are checked; Valid-Until is not: a mirror's sid (and, in time, trixie) Release can
  # be past its date on a machine whose mirror lags its clock (seen on a fresh Debian 12 root: "sid
  # InRelease is expired"), and what comes through here is either sha256-pinned (CRIU's source) or
  # test-only (the test containerds, cosign).
  APTOPTS=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
           -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache" -o "APT::Sandbox::User=root"
           -o "Acquire::Check-Valid-Until=false")
  apt-get "${APTOPTS[@]}" update -qq >/dev/null 2>&1 || die "$what: apt-get update of $* from $APT_MIRROR failed"
}

# --- test containerds (--dev) -------------------------------------------------------------------
# The containerd tests run against the versions platform teams run: this node's (Debian 12: 1.6,
# the apt package above), Debian 13 trixie's (1.7) and sid's (2.x: whatever sid carries, not a
# pinned version sid will drop). The trixie and sid packages are downloaded, never installed:
# `dpkg -x` unpacks each under $CACHE/containerd/<suite>, where tests/cri/builds.py finds it; their
# binaries run on Debian 12. A cached build is kept: delete its directory to fetch a newer one.
if [ "$DEV" = 1 ]; then
  TEST_CONTAINERDS="$CACHE/containerd"
  mkdir -p "$TEST_CONTAINERDS"
  exec 9>"$TEST_CONTAINERDS/.lock"
  flock 9   # another install fetching at the same time
  suites=()
  for suite in trixie sid; do
    [ -x "$TEST_CONTAINERDS/$suite/usr/bin/containerd" ] || suites+=("$suite")
  done
  if [ ${#suites[@]} -gt 0 ]; then
    private_apt "test containerd" "${suites[@]/#/deb }"
    for suite in "${suites[@]}"; do
      mkdir -p "$APTDIR/$suite"
      (cd "$APTDIR/$suite" && apt-get "${APTOPTS[@]}" download -qq "containerd/$suite" >/dev/null 2>&1) \
        || die "test containerd: apt-get download containerd/$suite from $APT_MIRROR failed"
      deb=$(echo "$APTDIR/$suite"/containerd_*.deb)
      unpacked=$(mktemp -d "$TEST_CONTAINERDS/.$suite.XXXXXX")
      dpkg -x "$deb" "$unpacked"
      dpkg-deb -f "$deb" Version > "$unpacked/VERSION"
      "$unpacked/usr/bin/containerd" --version >/dev/null 2>&1 || die "test containerd: $suite's containerd does not run here"
      rm -rf "${TEST_CONTAINERDS:?}/$suite"
      mv "$unpacked" "$TEST_CONTAINERDS/$suite"
      say "test containerd: $suite's containerd $(cat "$TEST_CONTAINERDS/$suite/VERSION") in $TEST_CONTAINERDS/$suite"
    done
    rm -rf "$APTDIR"
  else
    say "test containerd: trixie's $(cat "$TEST_CONTAINERDS/trixie/VERSION"), sid's $(cat "$TEST_CONTAINERDS/sid/VERSION") (cached)"
  fi
  exec 9>&-
fi

# --- cosign for the signature tests (--dev) -----------------------------------------------------
# The provenance tests prove interop with the real cosign: Debian 12 has none (its skopeo's sigstore
# support is disabled), trixie ships cosign 2.5. Downloaded and unpacked under $CACHE/cosign
# (tests/test_provenance.py finds it there), never installed into the system.
if [ "$DEV" = 1 ]; then
  COSIGN_DIR="$CACHE/cosign"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.cosign.lock"
  flock 9
  if [ -x "$COSIGN_DIR/usr/bin/cosign" ]; then
    say "cosign: trixie's $(cat "$COSIGN_DIR/VERSION") (cached)"
  else
    private_apt cosign "deb trixie"
    (cd "$APTDIR" && apt-get "${APTOPTS[@]}" download -qq "cosign/trixie" >/dev/null 2>&1) \
      || die "cosign: apt-get download cosign/trixie from $APT_MIRROR failed"
    deb=$(echo "$APTDIR"/cosign_*.deb)
    unpacked=$(mktemp -d "$CACHE/.cosign.XXXXXX")
    dpkg -x "$deb" "$unpacked"
    dpkg-deb -f "$deb" Version > "$unpacked/VERSION"
    "$unpacked/usr/bin/cosign" version >/dev/null 2>&1 || die "cosign: trixie's cosign does not run here"
    rm -rf "$COSIGN_DIR"
    mv "$unpacked" "$COSIGN_DIR"
    rm -rf "$APTDIR"
    say "cosign: trixie's cosign $(cat "$COSIGN_DIR/VERSION") in $COSIGN_DIR"
  fi
  exec 9>&-
fi

# --- CRIU: 4.1.1 with thaw's patches ------------------------------------------------------------
# thaw needs its own patches (install/criu-patches), so it builds CRIU itself and records what it
# built next to the binary; any other CRIU, or one built from other patches, is rebuilt.
criu_ok() {  # $1 = criu binary; true if version >= 4.0, `criu check` passes and it can dump
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
  [ -n "$v" ] || return 1
  [ "${v%%.*}" -ge 4 ] 2>/dev/null || return 1
  "$1" check >/dev/null 2>&1 || return 1
  criu_dumps_tcp "$1"
}
criu_dumps_tcp() {  # Linux >= 6.16 breaks socket dumps of unpatched CRIU 4.1.x: try one
  local dir pid rc
  dir=$(mktemp -d)
  # The process drops every descriptor it inherited beyond stdio (one flock(1) holds, as when this
  # installer runs under a lock, makes CRIU refuse the dump: "file locks" without --file-locks)
  # and says when it listens (a fixed wait can dump it mid-start on a loaded machine).
  setsid /usr/bin/python3 -c 'import os,socket,time; os.closerange(3, 1 << 16); s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen(); print(flush=True); time.sleep(120)' \
    </dev/null >"$dir/listening" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [ -s "$dir/listening" ] && break; sleep 0.05; done
  "$1" dump -t "$pid" -D "$dir" --leave-running --shell-job -o dump.log >/dev/null 2>&1
  rc=$?
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  [ $rc = 0 ] || say "criu: $1 cannot dump a process with a TCP socket here: $(grep Error "$dir/dump.log" 2>/dev/null | tail -n1)"
  rm -rf "$dir"
  return $rc
}
TARBALL="$CACHE/criu_${CRIU_VERSION}.orig.tar.xz"
criu_tarball() {  # CRIU's source, sha256-verified, in $TARBALL: the build and thaw's image schemas
  mkdir -p "$CACHE"
  if ! echo "$CRIU_SHA256  $TARBALL" | sha256sum -c --status 2>/dev/null; then
    # Debian publishes CRIU 4.1.1 in trixie (see private_apt above).
    private_apt criu "deb-src trixie"
    say "criu: fetching criu ${CRIU_VERSION} source from $APT_MIRROR (trixie)"
    # The .dsc and .debian.tar.xz may 404; the orig tarball is all the build needs.
    (cd "$APTDIR" && apt-get "${APTOPTS[@]}" source --download-only "criu=${CRIU_VERSION}-*" >/dev/null 2>&1 || \
       apt-get "${APTOPTS[@]}" source --download-only criu >/dev/null 2>&1 || true)
    [ -f "$APTDIR/criu_${CRIU_VERSION}.orig.tar.xz" ] || die "criu: could not download criu_${CRIU_VERSION}.orig.tar.xz"
    mv "$APTDIR/criu_${CRIU_VERSION}.orig.tar.xz" "$TARBALL"
    rm -rf "$APTDIR"
    echo "$CRIU_SHA256  $TARBALL" | sha256sum -c --status || { rm -f "$TARBALL"; die "criu: sha256 mismatch for $TARBALL"; }
  fi
  say "criu: tarball sha256 verified"
}
CRIU_WANT="criu $CRIU_VERSION; patches: $(cd "$SRC/install/criu-patches" && sha256sum -- *.patch | tr -s ' \n' ' ')"
CRIU_STAMP="$CRIU_DIR/criu.thaw-build"
if [ "$(cat "$CRIU_STAMP" 2>/dev/null)" = "$CRIU_WANT" ] && criu_ok "$CRIU_DIR/criu"; then
  say "criu: keeping $CRIU_DIR/criu ($CRIU_VERSION, built from the current patches, criu check passes)"
else
  if [ -f "$CRIU_STAMP" ]; then
    say "criu: $CRIU_DIR/criu was built from other patches or fails its checks; rebuilding $CRIU_VERSION"
  else
    say "criu: building $CRIU_VERSION with thaw's patches"
  fi
  criu_tarball
  BUILD="$CACHE/criu-${CRIU_VERSION}"
  rm -rf "$BUILD" && mkdir -p "$BUILD"
  tar -xJf "$TARBALL" -C "$BUILD" --strip-components=1
  for p in "$SRC"/install/criu-patches/*.patch; do
    [ -e "$p" ] || continue
    patch -d "$BUILD" -p1 -s < "$p" || die "criu: patch $(basename "$p") does not apply"
    say "criu: applied $(basename "$p")"
  done
  say "criu: building (make -j$(nproc) criu)"
  make -C "$BUILD" -j"$(nproc)" criu >"$CACHE/criu-build.log" 2>&1 || die "criu: build failed, see $CACHE/criu-build.log"
  rm -f "$CRIU_STAMP"
  install -D -m 0755 "$BUILD/criu/criu" "$CRIU_DIR/criu"
  hash -r
  criu_ok "$CRIU_DIR/criu" || die "criu: $CRIU_DIR/criu built but 'criu check' fails: $("$CRIU_DIR/criu" check 2>&1 | tail -n 3)"
  echo "$CRIU_WANT" > "$CRIU_STAMP"
  say "criu: installed $CRIU_DIR/criu ($CRIU_VERSION)"
fi
CRIU_BIN=$(command -v criu || true)
if [ -n "$CRIU_BIN" ] && [ "$CRIU_BIN" != "$CRIU_DIR/criu" ]; then
  say "criu: note: $CRIU_BIN comes first on PATH, not $CRIU_DIR/criu"
fi

# --- thaw virtualenv ----------------------------------------------------------------------------
VENV="$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
  say "thaw: creating virtualenv $VENV"
  /usr/bin/python3 -m venv "$VENV" || die "thaw: python3 -m venv failed"
fi
EXTRAS=""
[ "$DEV" = 1 ] && EXTRAS="test"
if [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null 2>&1; then EXTRAS="${EXTRAS:+$EXTRAS,}gpu"; fi
SPEC="thaw${EXTRAS:+[$EXTRAS]} from $SRC"
STAMP="$PREFIX/.installed"
# Always a regular (non-editable) install: an editable one adds a path finder to every Python
# start, ~10 ms on each runtime call. Reinstall whenever the sources change.
# The CRIU image schemas (thaw.shim.drivers.criu_proto) are generated from this CRIU's images/*.proto.
PROTOC_VERSION=$(protoc --version 2>/dev/null) || die "protoc: not found (apt package protobuf-compiler)"
WANT="$( (cd "$SRC" && find oci shim hooks pyproject.toml -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16) $EXTRAS; criu $CRIU_SHA256; $PROTOC_VERSION"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$VENV/bin/python" -c "import thaw.shim" 2>/dev/null; then
  say "thaw: pip install $SPEC"
  BUILD_TMP=$(mktemp -d)
  cp -a "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/oci" "$SRC/shim" "$SRC/hooks" "$BUILD_TMP/"
  criu_tarball
  bash "$SRC/install/criu-protos.sh" "$BUILD_TMP" "$TARBALL" || die "protoc: compiling CRIU's image schemas failed"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$BUILD_TMP${EXTRAS:+[$EXTRAS]}" 2>&1 \
    | grep -v "is ignored: it is neither" || true
  rm -rf "$BUILD_TMP"
  "$VENV/bin/python" -c "import thaw.shim.entry.runtime, thaw.hooks.main, thaw.oci.snapshot, thaw.shim.drivers.criu_decode" \
    || die "thaw: pip install failed"
  "$VENV/bin/python" -c "from thaw.shim.drivers import criu_decode; criu_decode.schemas()" \
    || die "thaw: CRIU's image schemas do not load with this protobuf runtime"
  echo "$WANT" > "$STAMP"
else
  say "thaw: $VENV is up to date"
fi
for cmd in thaw thaw-runtime thaw-hook; do
  [ -x "$VENV/bin/$cmd" ] || die "thaw: $VENV/bin/$cmd missing after install"
done
install -d -m 0755 "$BIN_DIR"
ln -sfn "$VENV/bin/thaw" "$BIN_DIR/thaw"
# thaw-runtime and thaw-hook run on every container operation: launch them with -I -S (no site
# processing, no environment influence) and the venv's site-packages put on sys.path directly.
SITE=$("$VENV/bin/python" -c 'import sysconfig as s; p=s.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u | tr '\n' ' ')
write_launcher() {  # $1 = command, $2 = module with main()
  local tmp
  tmp=$(mktemp "$BIN_DIR/.thaw-launcher.XXXXXX")
  {
    echo "#!$VENV/bin/python3 -IS"
    echo "# thaw launcher written by install/node.sh"
    echo "import sys"
    for p in $SITE; do echo "sys.path.append('$p')"; done
    echo "from $2 import main"
    echo "main()"
  } > "$tmp"
  chmod 0755 "$tmp"
  mv -f "$tmp" "$BIN_DIR/$1"
}
write_launcher thaw-hook thaw.hooks.main
# thaw-runtime is a small C front (install/runtime-front.c): it execs the next runtime itself when
# a call is certainly passthrough, and this Python launcher otherwise.
install -d -m 0755 "$PREFIX/libexec"
write_launcher thaw-runtime thaw.shim.entry.runtime
mv -f "$BIN_DIR/thaw-runtime" "$PREFIX/libexec/thaw-runtime-python"
bash "$SRC/install/runtime-front.sh" "$BIN_DIR/thaw-runtime" "$PREFIX/libexec/thaw-runtime-python" \
  || die "thaw: building thaw-runtime's front (install/runtime-front.c) failed"
say "thaw: commands linked in $BIN_DIR: thaw thaw-runtime thaw-hook"

# --- config, store, state -----------------------------------------------------------------------
install -d -m 0755 /etc/thaw
if [ ! -f /etc/thaw/config.yaml ]; then
  install -m 0644 "$SRC/install/config.yaml" /etc/thaw/config.yaml
  say "config: wrote default /etc/thaw/config.yaml"
else
  say "config: keeping existing /etc/thaw/config.yaml"
fi
install -d -m 0700 /var/lib/thaw /run/thaw
say "store: /var/lib/thaw and state /run/thaw are root-only (0700)"

if [ "$CONTAINERD" = 1 ]; then
  # with this installation's thaw: its virtualenv runs the installer, its thaw-runtime is the handler
  THAW_PREFIX="$PREFIX" THAW_RUNTIME_BIN="${THAW_RUNTIME_BIN:-$BIN_DIR/thaw-runtime}" \
    bash "$SRC/install/containerd.sh" || die "containerd: registering the thaw runtime failed"
fi

DOCTOR=(--quiet)
[ "$CONTAINERD" = 1 ] || DOCTOR+=(--skip-containerd)   # registering the handler is --containerd's job
"$VENV/bin/thaw" doctor "${DOCTOR[@]}" || die "thaw doctor reports problems (run 'thaw doctor' for details)"
say "done"

#!/usr/bin/env bash
# Build the installer image from this repository, with no container registry:
#   install/image/build.sh [BUNDLE.tar.gz]
# 1. the base: a Debian 12 minbase root made by mmdebstrap (SOURCE_DATE_EPOCH: the commit's time),
#    brought in with `podman import` as localhost/thaw-base:bookworm (kept: reused by later builds);
# 2. the bundle: install/bundle.sh build, unless one is given;
# 3. `podman build` of install/image/Containerfile -> localhost/thaw-installer:<version>;
# 4. its size and layers, written to bench/results/installer-image-<version>.txt.
# Push it to your registry with `podman push localhost/thaw-installer:<version> REGISTRY/...`,
# or `podman save` it and load it on the nodes.
# Environment: THAW_IMAGE_WORK (scratch, default /var/tmp/thaw-image), PODMAN (default podman).
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${THAW_IMAGE_WORK:-/var/tmp/thaw-image}
PODMAN=${PODMAN:-podman}
say() { printf '[thaw image] %s\n' "$*" >&2; }
die() { printf '[thaw image] ERROR: %s\n' "$*" >&2; exit 1; }
command -v "$PODMAN" >/dev/null && command -v mmdebstrap >/dev/null || die "needs podman and mmdebstrap (apt-get install podman mmdebstrap)"
mkdir -p "$WORK/ctx"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$SRC" log -1 --format=%ct)}

BASE=localhost/thaw-base:bookworm
if ! "$PODMAN" image exists "$BASE"; then
  mirror=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'; grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}') \
            | grep -E '/debian/?$' | head -n1 || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  say "base: mmdebstrap bookworm minbase from $mirror"
  mmdebstrap --quiet --variant=minbase bookworm "$WORK/base.tar" "$mirror"
  "$PODMAN" import --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$BASE" >/dev/null
  rm -f "$WORK/base.tar"
fi

bundle=${1:-}
[ -n "$bundle" ] || bundle=$(bash "$SRC/install/bundle.sh" build "$WORK/dist" | tail -n1)
version=$(tar -xzf "$bundle" -O --wildcards 'opt/thaw/*/share/VERSION')
# an OCI tag allows [A-Za-z0-9_.-]: '+' becomes '_'
tag=${version//+/_}
cp "$bundle" "$SRC/install/image/entrypoint.sh" "$SRC/install/image/Containerfile" "$WORK/ctx/"
say "podman build localhost/thaw-installer:$tag"
"$PODMAN" build -q --timestamp "$SOURCE_DATE_EPOCH" --build-arg VERSION="$version" --build-arg BASE="$BASE" \
  -t "localhost/thaw-installer:$tag" -f "$WORK/ctx/Containerfile" "$WORK/ctx" >/dev/null
rm -rf "$WORK/ctx" "$WORK/dist"
out=$SRC/bench/results/installer-image-$tag.txt
{
  echo "# install/image/build.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -m)"
  echo "image: localhost/thaw-installer:$tag"
  echo "id: $("$PODMAN" image inspect --format '{{.Id}}' "localhost/thaw-installer:$tag")"
  echo "size: $("$PODMAN" image inspect --format '{{.Size}}' "localhost/thaw-installer:$tag") bytes"
  echo "bundle: $(basename "$bundle") $(stat -c %s "$bundle") bytes sha256:$(sha256sum "$bundle" | cut -c1-64)"
  echo "layers (podman history):"
  "$PODMAN" history --no-trunc=false --format '{{.ID}} {{.Size}} {{.CreatedBy}}' "localhost/thaw-installer:$tag"
} > "$out"
say "wrote $out"
echo "localhost/thaw-installer:$tag"

#!/usr/bin/env bash
# CRIU's image schemas as Python classes (thaw.shim.drivers.criu_proto): protoc over the images/*.proto of
# the CRIU source tarball thaw builds from, into TREE/shim/drivers/criu_proto. A build product, never
# committed. protoc emits top-level imports between the generated modules: they are made
# package-relative, as CRIU's own pycriu build does. The one place that does this: install/node.sh,
# install/bundle.sh and bench/device/pack.sh call it.
#   install/criu-protos.sh TREE TARBALL
set -euo pipefail
tree=$1 tarball=$2
command -v protoc >/dev/null || { echo "criu-protos: protoc missing (apt package protobuf-compiler)" >&2; exit 1; }
protos=$(mktemp -d)
trap 'rm -rf "$protos"' EXIT
tar -xJf "$tarball" -C "$protos" --strip-components=1 --wildcards '*/images/*.proto' \
  || { echo "criu-protos: no images/*.proto in $tarball" >&2; exit 1; }
rm -f "$tree"/shim/drivers/criu_proto/*_pb2.py
protoc -I"$protos/images" --python_out="$tree/shim/drivers/criu_proto" "$protos"/images/*.proto \
  || { echo "criu-protos: protoc failed on $tarball's schemas" >&2; exit 1; }
sed -i -E 's/^import ([A-Za-z0-9_]+_pb2) as /from . import \1 as /' "$tree"/shim/drivers/criu_proto/*_pb2.py

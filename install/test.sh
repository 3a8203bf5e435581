#!/usr/bin/env bash
# Set up this machine (root, Debian 12) and run the whole test suite for real: runc, CRIU,
# containerd and CNI tests included. Missing prerequisites are failures here, not skips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash install/node.sh --dev
export THAW_TEST_STRICT=1
exec /opt/thaw/venv/bin/python -m pytest -v -p no:cacheprovider tests "$@"

#!/usr/bin/env bash
# Set up this machine (root, Debian 12) and run the whole test suite for real: runc, CRIU,
# containerd and CNI tests included. Missing prerequisites are failures here, not skips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash install/node.sh --dev
export THAW_TEST_STRICT=1
PREFIX=${THAW_PREFIX:-/opt/thaw}
export PATH="${THAW_BIN_DIR:-/usr/local/bin}:$PATH"
# Linters first (settings in pyproject.toml): any finding fails the run.
echo "[thaw test] ruff check"
"$PREFIX/venv/bin/ruff" check --no-cache .
echo "[thaw test] mypy"
"$PREFIX/venv/bin/mypy" --no-incremental
echo "[thaw test] import contracts"    # the layers, on the installed package node.sh just built
"$PREFIX/venv/bin/lint-imports" --no-cache
exec "$PREFIX/venv/bin/python" -m pytest -v -p no:cacheprovider tests "$@"

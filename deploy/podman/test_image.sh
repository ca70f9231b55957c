#!/usr/bin/env bash
# Builds layerd's container image with podman and proves it: health through the
# image's own layerd-cli, a verifying layerd-bench train run against it, and a
# `podman stop` that drains and exits 0 within the grace period. Prints the
# image size. (Calls in flight at SIGTERM finishing is tested in tests/ops.rs.)
# Run from the repo root (.ci/run does):
#
#   bash deploy/podman/test_image.sh
#
# The static binaries are built here on the host, and the Dockerfile's builder
# stage is substituted with them (`--build-context builder=DIR`): no registry is
# reachable from the CI machines, and the runtime stage (FROM scratch) needs
# none. The Dockerfile stays the one users build.
set -euo pipefail
export CONTAINERS_CONF="$PWD/deploy/podman/containers.conf"
IMAGE=localhost/layerd:test
NAME=layerd-image-test
ADDR=127.0.0.1:50097
GRACE=10

# layerd-bench too, in the same build (it drives the container from the host).
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build --release --locked --target x86_64-unknown-linux-gnu \
    --bin layerd --bin layerd-cli --bin layerd-bench
BIN=target/x86_64-unknown-linux-gnu/release
context=$(mktemp -d)
mkdir -p "$context/out"
cp "$BIN/layerd" "$BIN/layerd-cli" "$context/out/"
if ! ldd "$context/out/layerd" 2>&1 | grep -qE "statically linked|not a dynamic executable"; then
  echo "layerd is not a static binary:"; ldd "$context/out/layerd"; exit 1
fi

podman build --quiet --build-context builder="$context" -f deploy/Dockerfile -t "$IMAGE" .
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
echo "image $IMAGE: $size bytes ($(( size / 1000000 )) MB)"
[ "$size" -lt 20000000 ] || { echo "image is over 20 MB"; exit 1; }

podman rm -f "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" -e LAYERD_ADDR="$ADDR" -e LAYERD_SHUTDOWN_GRACE="${GRACE}s" "$IMAGE" >/dev/null
trap 'podman rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 50); do
  podman exec "$NAME" /usr/local/bin/layerd-cli --addr "$ADDR" health >/dev/null 2>&1 && break
  sleep 0.2
done
podman exec "$NAME" /usr/local/bin/layerd-cli --addr "$ADDR" health
podman exec "$NAME" /usr/local/bin/layerd-cli --addr "$ADDR" try relu 1,-2,3.5

"$BIN/layerd-bench" --addr "$ADDR" --mode train --kind sigmoid --elements 4096 \
  --concurrency 8 --duration 2s --warmup 200ms --session-header

# SIGTERM to PID 1 drains and exits: no wait for podman's SIGKILL.
started=$(date +%s%N)
podman stop -t $(( GRACE + 5 )) "$NAME" >/dev/null
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
echo "podman stop: exit code $code after ${elapsed_ms} ms (grace ${GRACE} s)"
podman logs "$NAME" 2>&1 | tail -3
[ "$code" = 0 ] || { echo "layerd did not exit cleanly"; exit 1; }
[ "$elapsed_ms" -lt $(( GRACE * 1000 )) ] || { echo "stop took longer than the grace period"; exit 1; }
podman logs "$NAME" 2>&1 | grep -q '"layerd stopped"' || { echo "no drain in the log"; exit 1; }
echo "image test passed"

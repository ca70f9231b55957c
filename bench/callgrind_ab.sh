#!/usr/bin/env bash
# The server's instruction count for a fixed number of calls, for two layerd builds: the same
# layerd-bench run against each server running under callgrind (valgrind). Instruction counts
# repeat for the same binary and inputs whatever else the machine does, so they settle what
# a wall-clock comparison on a shared 2-core machine cannot (its rounds move by up to 10 %).
#
#   bench/callgrind_ab.sh OLD/target/release/layerd target/release/layerd \
#       --mode train-step --network mlp --requests 200
#
# Prints each build's total (server start and stop included, the same for both) and B / A.
# Needs valgrind (Debian: valgrind) and a release build of layerd-bench beside the second binary.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 BINARY_A BINARY_B LAYERD_BENCH_ARGS..." >&2; exit 2; }
a=$1 b=$2
shift 2
bench="$(dirname "$b")/layerd-bench"
out=$(mktemp -d)
count() {
  local bin=$1 label=$2 port=$3
  shift 3
  valgrind --tool=callgrind --callgrind-out-file="$out/$label.out" "$bin" --addr "127.0.0.1:$port" \
    >"$out/$label.log" 2>&1 &
  local server=$!
  # Up once it answers (the first call costs the same on both builds).
  for _ in $(seq 1 120); do
    sleep 1
    "$bench" --addr "127.0.0.1:$port" --mode forward --kind identity --elements 1 --requests 1 \
      --warmup 0s >/dev/null 2>&1 && break
  done
  "$bench" --addr "127.0.0.1:$port" "$@" --warmup 0s >"$out/$label.bench"
  kill -TERM "$server"
  wait "$server" || true
  grep '^totals:' "$out/$label.out" | awk '{print $2}'
}
ia=$(count "$a" a 50191 "$@")
ib=$(count "$b" b 50192 "$@")
echo "A $ia instructions; B $ib instructions; B / A $(awk -v a="$ia" -v b="$ib" 'BEGIN {printf "%.4f", b / a}')"
rm -rf "$out"

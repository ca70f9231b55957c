#!/usr/bin/env python3
"""Half precision on the wire: ReLU train calls/s (Forward + Backward, every answer checked bit
for bit by layerd-bench) with float32, float16 and bfloat16 tensors of 1 Mi and 16 Mi elements,
straight at one layerd and through nginx (deploy/'s configuration), side by side in one run. The
figure that matters is elements per second: a half tensor carries the same elements in half the
bytes, and the server computes them in float32 either way.

    python3 bench/half.py            # ~4 min; writes bench/results/half.md and .json
    python3 bench/half.py --quick --profile debug --out DIR   # smoke run

Needs nginx (apt install nginx-light). The server runs with --max-message-bytes 65MiB, so that a
float32 tensor of 16 Mi elements (64 MiB) fits in a message, as nginx's client_max_body_size does.
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerd_server  # noqa: E402
from run import REPO, bench, bench_arguments, build, display, machine  # noqa: E402

#: Elements per tensor, and the calls each has in flight (fewer for the 64 MiB tensors).
SIZES = {1 << 20: 8, 1 << 24: 2}
#: The smoke run's (a debug build moves 16 Mi elements slower than its 0.5 s runs).
QUICK_SIZES = {1 << 16: 2}
DTYPES = ["f32", "f16", "bf16"]
ROUTES = ["direct", "nginx"]
#: The issue's target: float16's elements per second over float32's.
TARGET = 1.7


def measure(binary, addr, route, size, concurrency, dtype, args, tmp):
    """One verifying layerd-bench train run: its summary, and its command (without the JSON file)."""
    flags = ["--mode", "train", "--kind", "relu", "--dtype", dtype, "--elements", size, "--concurrency",
             concurrency, "--duration", args.duration, "--warmup", args.warmup, "--session-header"]
    [run] = bench(binary, addr, route, tmp / f"{route}-{size}-{dtype}-{time.monotonic_ns()}.json", *flags)
    assert run["mismatches"] == 0 and not run["errors"], run
    command = " ".join(map(str, [display(binary), "--addr", addr, "--label", route, *flags]))
    return dict(run, route=route, size=size), command


def main():
    args = bench_arguments(__doc__, "3s", ("500ms", "200ms"))
    sizes = QUICK_SIZES if args.quick else SIZES
    target = build(args.profile)
    layerd_server.BINARY = target / "layerd"
    from cluster import Proxy

    tmp = Path(tempfile.mkdtemp(prefix="layerd-half-"))
    server = layerd_server.Server("--max-message-bytes", "65MiB")
    proxy = None
    runs, commands = [], set()
    try:
        # deploy/'s nginx routes to three replicas by session; here all three are the one server.
        proxy = Proxy("nginx", [server.addr] * 3)
        addrs = {"direct": server.addr, "nginx": proxy.addr}
        for repeat in range(args.repeats):
            for size, concurrency in sizes.items():
                for route in ROUTES:
                    for dtype in DTYPES:
                        run, command = measure(target / "layerd-bench", addrs[route], route, size, concurrency,
                                               dtype, args, tmp)
                        commands.add(command)
                        runs.append(run)
                        print(f"  #{repeat} {route:6} {size:>9} {dtype:4}: {run['calls_per_s']:8.1f} calls/s "
                              f"{run['calls_per_s'] * size / 1e6:8.1f} M elements/s", flush=True)
    finally:
        if proxy:
            proxy.stop()
        server.stop()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "half.json").write_text(json.dumps(runs, indent=1))
    median = lambda key, route, size, dtype: statistics.median(  # noqa: E731
        r[key] if not callable(key) else key(r) for r in runs
        if (r["route"], r["size"], r["dtype"]) == (route, size, dtype))
    lines = ["# Half precision on the wire: float16 and bfloat16 against float32", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
             f"{machine(str(REPO / '.venv' / 'bin' / 'python'))}.", "",
             "layerd-bench train (Forward + Backward of relu, every answer checked bit for bit), "
             f"`--session-header`; median of {args.repeats} run(s) of {args.duration}, the dtypes interleaved. "
             "direct: one layerd; nginx: deploy/'s configuration in front of it. Elements per second count "
             "the tensor's elements once per call (each call sends x and dout and receives y and dx); "
             "sent MB/s is what went on the wire.", "",
             "| elements | concurrency | route | dtype | calls/s | M elements/s | sent MB/s | p99 ms | vs float32 |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    verdicts = []
    for size, concurrency in sizes.items():
        for route in ROUTES:
            base = median("calls_per_s", route, size, "f32")
            for dtype in DTYPES:
                rate = median("calls_per_s", route, size, dtype)
                sent = median("mb_per_s_sent", route, size, dtype)
                p99 = median(lambda r: r["latency_us"]["p99"], route, size, dtype) / 1000
                lines.append(f"| {size:,} | {concurrency} | {route} | {dtype} | {rate:,.1f} | {rate * size / 1e6:,.1f} "
                             f"| {sent:,.0f} | {p99:,.1f} | {rate / base:.2f}x |")
            ratio = median("calls_per_s", route, size, "f16") / base
            verdicts.append(f"{size:,} elements {route}: float16 {ratio:.2f}x float32's elements/s "
                            f"({'met' if ratio >= TARGET else 'not met'})")
    lines += ["", f"Target: float16 ≥ {TARGET}x float32's elements per second.", ""]
    lines += [f"- {v}" for v in verdicts]
    lines += ["", "## Commands", "", "```sh", f"python3 bench/half.py{' --quick' if args.quick else ''}",
              *sorted(commands), "```", ""]
    (args.out / "half.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Two layerd builds side by side: the same layerd-bench cases against each, in alternating
rounds on one machine, and the median of each side with their ratio (B / A).

For a change that must not cost speed (a refactor, a new option off by default): build the
code before it (A) and after it (B), then

    python3 bench/ab.py --a OLD/target/release/layerd --b target/release/layerd --rounds 3

Both servers run with their built-in defaults on loopback ports, started once and kept up;
the client is B's layerd-bench (every answer checked). The cases: ReLU Forward+Backward on
1 Ki float32 elements at concurrency 16 and on 1 Mi at concurrency 4, KServe ModelInfer of
relu_no_grad on 1 Mi (raw contents, one connection, 8 in flight), and TrainStep of the MLP
and of the convnet of `layerd-bench --network`. Prints a Markdown table with the CPU model.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "relu 1 Ki train, c16": ["--mode", "train", "--kind", "relu", "--elements", "1024", "--concurrency", "16"],
    "relu 1 Mi train, c4": ["--mode", "train", "--kind", "relu", "--elements", "1048576", "--concurrency", "4"],
    "KServe relu_no_grad 1 Mi, c8": ["--protocol", "kserve", "--mode", "forward", "--kind", "relu",
                                     "--model", "relu_no_grad", "--elements", "1048576", "--connections", "1",
                                     "--concurrency", "8", "--shared-memory", "none"],
    "MLP TrainStep": ["--mode", "train-step", "--network", "mlp"],
    "convnet TrainStep": ["--mode", "train-step", "--network", "convnet"],
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def start(binary: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([binary, "--addr", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    if server.poll() is not None:
        sys.exit(f"{binary} exited at start ({server.returncode})")
    return server


def rate(bench: str, port: int, case: list, duration: str) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([bench, "--addr", f"127.0.0.1:{port}", *case, "--duration", duration, "--warmup", "1s",
                        "--json", out.name], check=True, stdout=subprocess.DEVNULL)
        report = json.loads(Path(out.name).read_text())
    runs = report["runs"] if isinstance(report, dict) else report
    return runs[0]["calls_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="layerd binary A (before)")
    parser.add_argument("--b", required=True, help="layerd binary B (after)")
    parser.add_argument("--bench", help="layerd-bench binary (default: beside --b)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="4s")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    bench = args.bench or str(Path(args.b).with_name("layerd-bench"))
    servers = {"A": start(args.a, 50161), "B": start(args.b, 50162)}
    ports = {"A": 50161, "B": 50162}
    try:
        print(f"CPU: {cpu_model()}; client: layerd-bench; medians of {args.rounds} alternating rounds "
              f"of {args.duration}\n")
        print("| case | A calls/s | B calls/s | B / A |\n|---|---:|---:|---:|")
        for name in args.cases:
            got = {"A": [], "B": []}
            for round_ in range(args.rounds):
                order = ("A", "B") if round_ % 2 == 0 else ("B", "A")
                for side in order:
                    got[side].append(rate(bench, ports[side], CASES[name], args.duration))
            a, b = statistics.median(got["A"]), statistics.median(got["B"])
            print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.3f} |", flush=True)
    finally:
        for server in servers.values():
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()

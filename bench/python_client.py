#!/usr/bin/env python3
"""The Python client with large tensors, with and without layerd.tune_malloc(), side by side in
one run; layerd-bench (the Rust client) on the same calls as the ceiling.

    python3 bench/python_client.py            # writes bench/results/python_client.{md,json}
    python3 bench/python_client.py --quick --profile debug   # CI's smoke run (figures mean nothing)

Cases, all float32, the shapes of the MLP of bench/train.py (batch 100 × 784): a Forward through
identity (the transport alone: 313 KB each way), a relu Forward then Backward, and a TrainStep of
the MLP answering dx (split learning: x up, dx down). Each measurement runs in a fresh process for
--seconds after a warm-up; the cases and settings alternate for --rounds rounds; medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402  (the MLP's shapes, batches and parameters; free_port)

REPO = train.REPO
CASES = ["identity forward", "relu forward + backward", "mlp train_step return_dx"]
SETTINGS = ["glibc defaults", "tune_malloc()", "layerd-bench (Rust)"]


def worker(case, setting, seconds, addr):
    import numpy as np
    import layerd
    if setting == "tune_malloc()":
        assert layerd.tune_malloc(), "nothing to tune on this platform"
    batches, dtype = train.data("mlp")
    with layerd.Client(addr).session() as s:
        if case == "mlp train_step return_dx":
            net = s.sequential(train.members("mlp"), params=train.initial("mlp", dtype), dtype=dtype)
            sgd = s.optimizer("sgd", lr=train.LR, layers=[net])
            return train.timed(lambda x, t: net.train_step(x, t, sgd, return_dx=True), batches, seconds)
        layer = s.layer(case.split()[0])
        dout = np.ones((100, 784), np.float32)

        def call(x, _t):
            y = layer.forward(x)
            if case == "relu forward + backward":
                layer.backward(dout)
            return y
        return train.timed(call, batches, seconds)


def rust(case, seconds, addr, binary):
    """Calls/s of layerd-bench on the same call; None where it has no such mode."""
    if case == "mlp train_step return_dx":
        return None  # its train-step mode does not ask for dx
    mode, kind = ("forward", "identity") if case == "identity forward" else ("train", "relu")
    run = train.layerd_bench(binary, addr, "--mode", mode, "--kind", kind, "--shape", "100,784", "--dtype", "f32",
                             "--duration", f"{seconds}s", "--warmup", "0.5s")
    # A train cycle is two calls; report cycles/s, as the Python rows do.
    return run["calls_per_s"] / (2 if mode == "train" else 1)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(worker(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="0.3 s per measurement, one round")
    parser.add_argument("--profile", choices=["release", "debug"], default="release")
    parser.add_argument("--out", default=str(train.RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.3, 1
    binaries = train.built(args.profile)
    addr = f"127.0.0.1:{train.free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERD_", "MALLOC_"))}
    server = subprocess.Popen([str(binaries / "layerd"), "--addr", addr], stderr=subprocess.DEVNULL, env=env)
    samples = {(c, s): [] for c in CASES for s in SETTINGS}
    try:
        train.wait_for_port(addr)
        for r in range(args.rounds):
            for case in CASES:
                for setting in SETTINGS:
                    if setting.startswith("layerd-bench"):
                        rate = rust(case, args.seconds, addr, str(binaries / "layerd-bench"))
                    else:
                        done = subprocess.run([sys.executable, __file__, "--worker", case, setting, str(args.seconds), addr],
                                              capture_output=True, text=True, env=env, timeout=args.seconds * 10 + 60)
                        if done.returncode != 0:
                            raise RuntimeError(f"{case} / {setting} failed:\n{done.stderr}")
                        rate = float(done.stdout.strip().splitlines()[-1])
                    samples[(case, setting)].append(rate)
                    print(f"round {r + 1}: {case:26s} {setting:20s} {rate if rate is not None else float('nan'):9.1f}/s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    median = lambda values: statistics.median(values) if None not in values else None  # noqa: E731
    medians = {c: {s: median(samples[(c, s)]) for s in SETTINGS} for c in CASES}
    command = f"python3 bench/python_client.py{' --quick' if args.quick else ''}{' --profile debug' if args.profile == 'debug' else ''}"
    lines = ["# The Python client with large tensors: glibc's defaults vs layerd.tune_malloc()", "",
             f"`{command}` — {args.rounds} rounds of {args.seconds:g} s per case and setting, interleaved, medians; "
             "calls (or cycles, or training steps) per second; float32 (100, 784) tensors, 313 KB.", "",
             "| case | " + " | ".join(SETTINGS) + " | tune_malloc() / defaults |", "|---|" + "---:|" * (len(SETTINGS) + 1)]
    for case in CASES:
        m = medians[case]
        cells = [f"{m[s]:,.0f}" if m[s] is not None else "—" for s in SETTINGS]
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {m['tune_malloc()'] / m['glibc defaults']:.2f}x |")
    lines.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "python_client.md").write_text("\n".join(lines))
    (out / "python_client.json").write_text(json.dumps(
        {"seconds": args.seconds, "rounds": args.rounds, "medians": medians,
         "samples": {f"{c}/{s}": samples[(c, s)] for c in CASES for s in SETTINGS}}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

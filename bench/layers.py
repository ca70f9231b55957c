#!/usr/bin/env python3
"""The trainable kernels against numpy, in-process, one thread, float32, side by side in one run:
affine 784->100 on a batch of 100, convolution 30 filters 5x5 on 100x1x28x28, max pooling 2x2
stride 2 on 100x30x24x24, each Forward + Backward (dx included).

    python3 bench/layers.py            # writes bench/results/layers.md and layers.json

layerd's kernels run in benches/layers.rs (`cargo bench --bench layers -- --json`, release
build, the server's allocator); numpy runs the tests' reference layers
(tests/python/reference_training.py, the classic numpy classes) with BLAS limited to one thread
(threadpoolctl), OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset as in bench/matmul.py. Both
report medians; the two alternate for --rounds rounds and the ratio is of the medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGETS = {"affine": 1.0, "convolution": 3.0, "pooling": 10.0}

NUMPY = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
sys.path.insert(0, sys.argv[1])
import reference_training as ref
rng = np.random.default_rng(0)
f = lambda *s: rng.uniform(-1, 1, s).astype(np.float32)

def affine():
    layer, x = ref.Affine(f(784, 100), f(100)), f(100, 784)
    def run():
        y = layer.forward(x); layer.backward(y)
    return run

def convolution():
    layer, x = ref.Convolution(f(30, 1, 5, 5), f(30), 1, 0), f(100, 1, 28, 28)
    def run():
        y = layer.forward(x); layer.backward(y)
    return run

def pooling():
    layer, x = ref.Pooling(2, 2, 2, 0), f(100, 30, 24, 24)
    def run():
        y = layer.forward(x); layer.backward(y)
    return run

out = {}
with threadpool_limits(limits=1):
    for name, make in [("affine", affine), ("convolution", convolution), ("pooling", pooling)]:
        run = make()
        for _ in range(3):
            run()
        times = []
        for _ in range(15):
            start = time.perf_counter(); run(); times.append((time.perf_counter() - start) * 1e3)
        out[name] = sorted(times)[len(times) // 2]
print(json.dumps({"numpy": np.__version__, "ms": out}))
"""


def rust():
    done = subprocess.run(["cargo", "bench", "--bench", "layers", "--", "--json"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
    return {r["case"]: r for r in map(json.loads, (l for l in done.splitlines() if l.startswith("{")))}


def numpy():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    done = subprocess.run([sys.executable, "-c", NUMPY, str(REPO / "tests" / "python")], env=env, check=True,
                          capture_output=True, text=True).stdout
    return json.loads(done)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--benches", "-q"], cwd=REPO, check=True)
    ours, theirs, what = {}, {}, {}
    version = ""
    for _ in range(args.rounds):
        for case, r in rust().items():
            ours.setdefault(case, []).append(r["ms"])
            what[case] = r["what"]
        n = numpy()
        version = n["numpy"]
        for case, ms in n["ms"].items():
            theirs.setdefault(case, []).append(ms)
    rows = []
    for case in TARGETS:
        a, b = statistics.median(ours[case]), statistics.median(theirs[case])
        rows.append({"case": case, "what": what[case], "layerd_ms": a, "numpy_ms": b, "speedup": b / a,
                     "target": TARGETS[case], "met": b / a >= TARGETS[case]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layers.json").write_text(json.dumps({"numpy": version, "rows": rows}, indent=1))
    lines = ["# Trainable kernels vs numpy", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this machine: float32, one thread, "
             f"Forward + Backward with dx, medians of {args.rounds} alternating rounds (each a median of 15 runs). "
             f"numpy {version} runs the tests' reference layers with one BLAS thread.", "",
             "Command: `python3 bench/layers.py`", "",
             "| kernel | layerd ms | numpy ms | layerd speed-up | target |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['layerd_ms']:.2f} | {r['numpy_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"≥ {r['target']:g}x {'met' if r['met'] else 'NOT met'} |")
    (args.out / "layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

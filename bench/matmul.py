#!/usr/bin/env python3
"""Which matrix product for the trainable layers: ndarray's (matrixmultiply), the gemm
crate, and numpy's BLAS (OpenBLAS), one thread each, the shapes affine and convolution
layers multiply, float32, in one run.

    python3 bench/matmul.py            # writes bench/results/matmul.md and matmul.json

The Rust candidates run in benches/matmul.rs (`cargo bench --bench matmul -- --json`); numpy
runs here with BLAS limited to one thread (threadpoolctl). OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, set on some machines to work around old OpenBLAS builds, slow a current
one down: they are unset for the numpy measurement only, and the kernel OpenBLAS then picks
is reported.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

NUMPY = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
shapes = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
out = []
with threadpool_limits(limits=1):
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")} for i in threadpool_info()]
    for name, m, k, n in shapes:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        b = rng.uniform(-1, 1, (k, n)).astype(np.float32)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.05:
            a @ b; calls += 1
        times = []
        for _ in range(27):
            start = time.perf_counter()
            for _ in range(calls):
                a @ b
            times.append((time.perf_counter() - start) / calls)
        times.sort()
        seconds = times[len(times) // 2]
        out.append({"shape": name, "m": m, "k": k, "n": n, "candidate": f"numpy {np.__version__} (OpenBLAS)",
                    "seconds": seconds, "gflops": 2 * m * k * n / seconds / 1e9})
print(json.dumps({"blas": blas, "runs": out}))
"""


def main():
    RESULTS.mkdir(parents=True, exist_ok=True)
    rust = subprocess.run(["cargo", "bench", "--bench", "matmul", "--", "--json"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
    runs = [json.loads(line) for line in rust.splitlines() if line.startswith("{")]
    shapes = []
    for r in runs:
        if [r["shape"], r["m"], r["k"], r["n"]] not in shapes:
            shapes.append([r["shape"], r["m"], r["k"], r["n"]])
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    numpy = json.loads(subprocess.run([sys.executable, "-c", NUMPY, json.dumps(shapes)], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    runs += numpy["runs"]
    (RESULTS / "matmul.json").write_text(json.dumps({"blas": numpy["blas"], "runs": runs}, indent=1))

    candidates = list(dict.fromkeys(r["candidate"] for r in runs))
    by = {(r["shape"], r["candidate"]): r for r in runs}
    numpy_name = candidates[-1]
    lines = ["# Matrix product: which dependency", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: float32, one thread each, "
             "medians of 27 timed batches (the Rust candidates interleaved). BLAS behind numpy: "
             + ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['num_threads']} thread)"
                         for b in numpy["blas"] if b.get("internal_api")) + ".", "",
             "| product (m×k · k×n) | " + " | ".join(f"{c} GFLOP/s" for c in candidates)
             + " | " + " | ".join(f"{c} / numpy" for c in candidates[:-1]) + " |",
             "|---|" + "---:|" * (2 * len(candidates) - 1)]
    for name, m, k, n in shapes:
        cells = [f"{by[(name, c)]['gflops']:.1f}" for c in candidates]
        ratios = [f"{by[(name, c)]['gflops'] / by[(name, numpy_name)]['gflops']:.0%}" for c in candidates[:-1]]
        lines.append(f"| {name} ({m}×{k} · {k}×{n}) | " + " | ".join(cells + ratios) + " |")
    lines += ["", "```sh", "python3 bench/matmul.py", "cargo bench --bench matmul   # the Rust candidates alone", "```", ""]
    (RESULTS / "matmul.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

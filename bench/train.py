#!/usr/bin/env python3
"""Training steps per second: the same network, batch and dtype trained by layerd remotely (one
TrainStep per step from the Python client, x and t sent every step), by the classic numpy layers
in-process (BLAS on one thread, and unlimited), and by JAX on the CPU (`jax.jit` of the step),
side by side in one run.

    python3 bench/train.py                 # writes bench/results/train.{md,json,svg}
    python3 bench/train.py --quick --profile debug   # CI's smoke run (the figures mean nothing)

Networks (SGD, lr 0.1): two-layer 64-50-10 on scikit-learn's digits (float64, batch 100);
MLP 784-100-10 (float32, batch 100); convnet 1x28x28 convolution 30x5x5 -> relu -> max pool 2
-> affine 100 -> relu -> affine 10 (float32, batch 100). Inputs: eight fixed random batches,
cycled. Each system runs in its own process for --seconds per measurement, after a warm-up
(JAX's compilation excluded); the systems alternate for --rounds rounds and each figure is the
median. layerd's server is the release build on the same two cores as its client; its own time
per step comes from its call-duration histogram (TrainStep's sum / count over the Python
client's runs), so the table shows the transport's share of the round trip. The Python client
calls layerd.tune_malloc() first, as its README advises. "layerd (pipelined)" is the same
Python client with net.train_steps: the same TrainSteps, numbered (x-layerd-after-steps) so the
server applies them in order, with up to 3 in flight, so the client encodes and sends the next
step while the server computes this one. "layerd (pipelined, 1 worker)" is the same against a
second server started with --worker-threads 1: its steps run on a thread of their own besides the
async workers, so on two cores shared with the client one worker leaves the client a core. "layerd (Rust
client)" is layerd-bench --mode train-step on the same networks (every loss checked against its
float64 reference): the same server without the Python client's per-call cost. numpy runs the tests' reference layers
(tests/python/reference_training.py).
"""
import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NETWORKS = ["two-layer", "mlp", "convnet"]
SYSTEMS = ["layerd", "layerd (pipelined)", "layerd (pipelined, 1 worker)", "layerd (Rust client)", "numpy (1 thread)", "numpy", "jax"]
#: The rows the targets are checked for: the Python client one step at a time, and pipelined
#: (against the default server, and against one started with --worker-threads 1).
LAYERD_ROWS = ["layerd", "layerd (pipelined)", "layerd (pipelined, 1 worker)"]
#: The server of the "1 worker" row: one async worker thread, the other core left to the client.
ONE_WORKER_FLAGS = ["--worker-threads", "1"]
LR = 0.1
#: The issue's targets, as ratios of layerd's steps/s to the system's.
TARGETS = {("mlp", "numpy (1 thread)"): 1.2, ("mlp", "jax"): 0.6,
           ("convnet", "numpy (1 thread)"): 4.0, ("convnet", "jax"): 2.5}


# --------------------------------------------------------------------------- the workers

def data(network):
    """Eight (x, t) batches of 100 and the network's dtype."""
    import numpy as np
    rng = np.random.default_rng(0)
    if network == "two-layer":
        from sklearn.datasets import load_digits
        digits = load_digits()
        x, t = digits.data / 16.0, digits.target.astype(np.int64)
        batches = [rng.choice(len(x), 100, replace=False) for _ in range(8)]
        return [(x[b], t[b]) for b in batches], np.float64
    shape = (100, 784) if network == "mlp" else (100, 1, 28, 28)
    return [(rng.uniform(0, 1, shape).astype(np.float32), rng.integers(0, 10, 100).astype(np.int64))
            for _ in range(8)], np.float32


def initial(network, dtype):
    """Initial parameters by name, the same for every system."""
    import numpy as np
    rng = np.random.default_rng(1)
    n = lambda *shape: (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1] if len(shape) == 2 else shape[1:]))).astype(dtype)  # noqa: E731
    z = lambda k: np.zeros(k, dtype)  # noqa: E731
    if network == "two-layer":
        return {"fc1.W": n(64, 50), "fc1.b": z(50), "fc2.W": n(50, 10), "fc2.b": z(10)}
    if network == "mlp":
        return {"fc1.W": n(784, 100), "fc1.b": z(100), "fc2.W": n(100, 10), "fc2.b": z(10)}
    return {"conv.W": n(30, 1, 5, 5), "conv.b": z(30), "fc1.W": n(30 * 12 * 12, 100), "fc1.b": z(100),
            "fc2.W": n(100, 10), "fc2.b": z(10)}


def members(network):
    """The layerd sequential."""
    if network == "convnet":
        return [("conv", "convolution", {"in_channels": 1, "out_channels": 30, "kernel_h": 5, "kernel_w": 5}),
                ("relu1", "relu"), ("pool", "pooling", {"pool_h": 2, "pool_w": 2}),
                ("fc1", "affine", {"in_features": 30 * 12 * 12, "out_features": 100}), ("relu2", "relu"),
                ("fc2", "affine", {"in_features": 100, "out_features": 10}), ("loss", "softmax_with_loss")]
    inputs, hidden = (64, 50) if network == "two-layer" else (784, 100)
    return [("fc1", "affine", {"in_features": inputs, "out_features": hidden}), ("relu1", "relu"),
            ("fc2", "affine", {"in_features": hidden, "out_features": 10}), ("loss", "softmax_with_loss")]


def timed(step, batches, seconds):
    for i in range(10):
        step(*batches[i % len(batches)])
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(*batches[steps % len(batches)])
        steps += 1
    return steps / (time.perf_counter() - start)


def worker_layerd(network, seconds, addr, pipelined):
    import layerd
    layerd.tune_malloc()  # as the client's README advises for large tensors (bench/python_client.py)
    batches, dtype = data(network)
    with layerd.Client(addr).session() as s:
        net = s.sequential(members(network), params=initial(network, dtype), dtype=dtype)
        sgd = s.optimizer("sgd", lr=LR, layers=[net])
        if not pipelined:
            return timed(lambda x, t: net.train_step(x, t, sgd), batches, seconds)
        # train_steps: the same TrainSteps, numbered, up to 3 in flight (its default); it draws
        # the batches itself, in the same order, so each timed step takes the next answer.
        losses = net.train_steps(itertools.cycle(batches), sgd)
        try:
            return timed(lambda _x, _t: next(losses), batches, seconds)
        finally:
            losses.close()


def worker_numpy(network, seconds, threads):
    from threadpoolctl import threadpool_limits
    sys.path.insert(0, str(REPO / "tests" / "python"))
    import reference_training as ref
    batches, dtype = data(network)
    p = initial(network, dtype)
    layers = {"fc1": ref.Affine(p["fc1.W"], p["fc1.b"]), "fc2": ref.Affine(p["fc2.W"], p["fc2.b"])}
    if network == "convnet":
        layers["conv"] = ref.Convolution(p["conv.W"], p["conv.b"])
        chain = [("conv", layers["conv"]), ("relu1", ref.Relu()), ("pool", ref.Pooling(2, 2)),
                 ("fc1", layers["fc1"]), ("relu2", ref.Relu()), ("fc2", layers["fc2"]), ("loss", ref.SoftmaxWithLoss())]
    else:
        chain = [("fc1", layers["fc1"]), ("relu1", ref.Relu()), ("fc2", layers["fc2"]), ("loss", ref.SoftmaxWithLoss())]
    net, sgd = ref.Sequential(chain), ref.SGD(lr=LR)
    params = {f"{name}.{k}": getattr(layer, k) for name, layer in layers.items() for k in ("W", "b")}

    def step(x, t):
        net.forward(x, t=t)
        net.backward()
        sgd.update(params, net.grads())

    with threadpool_limits(limits=threads):
        return timed(step, batches, seconds)


def worker_jax(network, seconds):
    import jax
    import jax.numpy as jnp
    batches, dtype = data(network)
    if dtype.__name__ == "float64":
        jax.config.update("jax_enable_x64", True)
    params = {k: jnp.asarray(v) for k, v in initial(network, dtype).items()}

    def loss_fn(p, x, t):
        if network == "convnet":
            h = jax.lax.conv_general_dilated(x, p["conv.W"], (1, 1), "VALID") + p["conv.b"][None, :, None, None]
            h = jnp.maximum(h, 0)
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
            h = h.reshape(h.shape[0], -1)
        else:
            h = x
        h = jnp.maximum(h @ p["fc1.W"] + p["fc1.b"], 0)
        scores = h @ p["fc2.W"] + p["fc2.b"]
        y = jax.nn.softmax(scores)
        return -jnp.sum(jnp.log(y[jnp.arange(t.shape[0]), t] + 1e-7)) / t.shape[0]

    @jax.jit
    def step(p, x, t):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, t)
        return loss, {k: p[k] - LR * grads[k] for k in p}

    state = {"p": params}
    device = [(jnp.asarray(x), jnp.asarray(t)) for x, t in batches]  # as numpy's, no transfer timed

    def run(x, t):
        loss, state["p"] = step(state["p"], x, t)
        loss.block_until_ready()

    return timed(run, device, seconds)


def worker_layerd_bench(network, seconds, addr):
    """layerd-bench --mode train-step: the same network from a Rust client, every loss checked
    against its own float64 reference (it exits 3 on a wrong answer)."""
    binary = os.environ.get("LAYERD_BENCH_BINARY", str(REPO / "target" / "release" / "layerd-bench"))
    if network == "convnet" and "debug" in binary:
        return float("nan")  # its float64 reference takes minutes in a debug build
    dtype = "f64" if network == "two-layer" else "f32"
    return layerd_bench(binary, addr, "--mode", "train-step", "--network", network, "--dtype", dtype,
                        "--duration", f"{seconds}s", "--warmup", "1s")["calls_per_s"]


def layerd_bench(binary, addr, *args):
    """One layerd-bench run's report, which must have no wrong answer and no failed call."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "run.json"
        subprocess.run([binary, "--addr", addr, *args, "--quiet", "--json", str(report)], check=True,
                       stdout=subprocess.DEVNULL)
        run = json.loads(report.read_text())["runs"][0]
    assert run["mismatches"] == 0 and not run["errors"], run
    return run


def built(profile):
    """target/<profile>, with layerd and layerd-bench built there if they are missing."""
    binaries = REPO / "target" / profile
    if not (binaries / "layerd").exists() or not (binaries / "layerd-bench").exists():
        flags = ["--release"] if profile == "release" else []
        subprocess.run(["cargo", "build", *flags, "--bin", "layerd", "--bin", "layerd-bench"], cwd=REPO, check=True)
    return binaries


def wait_for_port(addr):
    """Waits (up to 10 s) until something accepts connections at host:port."""
    for _ in range(100):
        try:
            socket.create_connection(addr.split(":"), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)


def worker(system, network, seconds, addr):
    if system in LAYERD_ROWS:
        return worker_layerd(network, seconds, addr, pipelined=system != "layerd")
    if system == "layerd (Rust client)":
        return worker_layerd_bench(network, seconds, addr)
    if system.startswith("numpy"):
        return worker_numpy(network, seconds, 1 if "1 thread" in system else None)
    return worker_jax(network, seconds)


# --------------------------------------------------------------------------- the driver

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_seconds(metrics_addr):
    """(sum, count) of TrainStep's call durations so far."""
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("layerd_call_duration_seconds_sum") and 'method="TrainStep"' in line:
            total += float(line.split()[-1])
        if line.startswith("layerd_call_duration_seconds_count") and 'method="TrainStep"' in line:
            count += float(line.split()[-1])
    return total, count


def measure(system, network, seconds, addr):
    done = subprocess.run([sys.executable, __file__, "--worker", system, network, str(seconds), addr],
                          capture_output=True, text=True, timeout=seconds * 10 + 120)
    if done.returncode != 0:
        raise RuntimeError(f"{system} {network} failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


def chart(results, path):
    """Grouped bars of steps/s (log scale), one group per network."""
    import math
    colours = {"layerd": "#1f77b4", "layerd (pipelined)": "#17becf", "layerd (pipelined, 1 worker)": "#9edae5",
               "layerd (Rust client)": "#aec7e8", "numpy (1 thread)": "#ff7f0e",
               "numpy": "#ffbb78", "jax": "#2ca02c"}
    width, height, left, bottom = 1200, 380, 70, 50
    top = max(v for r in results.values() for v in r.values() if v == v)  # NaN: not measured
    scale = lambda v: (math.log10(max(v, 1)) / math.log10(top * 1.5)) * (height - bottom - 30)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="DejaVu Sans, sans-serif" font-size="12">',
           f'<text x="{left}" y="18" font-size="14">Training steps per second (log scale; medians; higher is better)</text>']
    group = (width - left - 20) / len(results)
    for g, (network, row) in enumerate(results.items()):
        for i, system in enumerate(SYSTEMS):
            value = row[system]
            if value != value:
                continue
            h = scale(value)
            x = left + g * group + 10 + i * (group - 20) / len(SYSTEMS)
            w = (group - 20) / len(SYSTEMS) - 4
            y = height - bottom - h
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{colours[system]}"/>')
            out.append(f'<text x="{x + w / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" font-size="10">{value:,.0f}</text>')
        out.append(f'<text x="{left + g * group + group / 2:.1f}" y="{height - bottom + 18}" text-anchor="middle">{network}</text>')
    x = left
    for system in SYSTEMS:  # each legend entry as wide as its label (about 6 px a character at 11 px)
        out.append(f'<rect x="{x}" y="{height - 18}" width="10" height="10" fill="{colours[system]}"/>'
                   f'<text x="{x + 14}" y="{height - 9}" font-size="11">{system}</text>')
        x += 14 + 6 * len(system) + 16
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        system, network, seconds, addr = sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
        print(worker(system, network, seconds, addr))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="0.5 s per measurement, one round")
    parser.add_argument("--profile", choices=["release", "debug"], default="release",
                        help="which build of layerd and layerd-bench to run (debug: a CI smoke run)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.5, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    binaries = built(args.profile)
    os.environ["LAYERD_BENCH_BINARY"] = str(binaries / "layerd-bench")
    addr, metrics_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERD_")}
    one_worker_addr = f"127.0.0.1:{free_port()}"
    servers = [subprocess.Popen([str(binaries / "layerd"), "--addr", addr, "--metrics-addr", metrics_addr],
                                stderr=subprocess.DEVNULL, env=env),
               subprocess.Popen([str(binaries / "layerd"), "--addr", one_worker_addr, *ONE_WORKER_FLAGS],
                                stderr=subprocess.DEVNULL, env=env)]
    try:
        for a in (addr, metrics_addr, one_worker_addr):
            wait_for_port(a)
        samples = {(n, s): [] for n in NETWORKS for s in SYSTEMS}
        server_time = {n: [0.0, 0.0] for n in NETWORKS}
        for r in range(args.rounds):
            for network in NETWORKS:
                for system in SYSTEMS:
                    before = server_seconds(metrics_addr) if system == "layerd" else None
                    rate = measure(system, network, args.seconds, one_worker_addr if "1 worker" in system else addr)
                    if before:
                        after = server_seconds(metrics_addr)
                        server_time[network][0] += after[0] - before[0]
                        server_time[network][1] += after[1] - before[1]
                    samples[(network, system)].append(rate)
                    print(f"round {r + 1}: {network:9s} {system:29s} {rate:9.1f} steps/s", flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)

    medians = {n: {s: statistics.median(samples[(n, s)]) for s in SYSTEMS} for n in NETWORKS}
    lines = ["# Training steps per second: layerd remote vs numpy and JAX in-process", "",
             f"`python3 bench/train.py{' --quick' if args.quick else ''}{' --profile debug' if args.profile == 'debug' else ''}` — {args.rounds} rounds of "
             f"{args.seconds:g} s per system and network, interleaved, medians; client and server share the "
             "machine's cores. layerd: one TrainStep per step from the Python client, x and t sent every step "
             "(pipelined: `train_steps`, the same numbered TrainSteps with up to 3 in flight; 1 worker: against a "
             f"server started with `{' '.join(ONE_WORKER_FLAGS)}`).", "",
             "| network | " + " | ".join(SYSTEMS) + " | " + " | ".join(f"{row} / {s}" for row in LAYERD_ROWS for s in ("numpy (1 thread)", "JAX"))
             + " | layerd server ms/step | round trip ms/step (Python client) |",
             "|---|" + "---:|" * (len(SYSTEMS) + 2 * len(LAYERD_ROWS) + 2)]
    report = {"seconds": args.seconds, "rounds": args.rounds, "samples": {}, "medians": medians, "ratios": {},
              "server_ms_per_step": {}}
    for network in NETWORKS:
        m = medians[network]
        ratios = {row: {s: m[row] / m[s] for s in ("numpy (1 thread)", "jax")} for row in LAYERD_ROWS}
        total, count = server_time[network]
        server_ms = 1000 * total / count if count else float("nan")
        lines.append(f"| {network} | " + " | ".join(f"{m[s]:,.1f}" for s in SYSTEMS) + " | "
                     + " | ".join(f"{ratios[row][s]:.2f}x" for row in LAYERD_ROWS for s in ("numpy (1 thread)", "jax"))
                     + f" | {server_ms:.2f} | {1000 / m['layerd']:.2f} |")
        report["ratios"][network] = ratios
        report["server_ms_per_step"][network] = server_ms
        for s in SYSTEMS:
            report["samples"][f"{network}/{s}"] = samples[(network, s)]
    for row in LAYERD_ROWS:
        lines += ["", f"Targets, {row}: " + ", ".join(
            f"{n} ≥ {v}x {s}: {'met' if report['ratios'][n][row][s] >= v else 'not met'} ({report['ratios'][n][row][s]:.2f}x)"
            for (n, s), v in TARGETS.items())]
    lines.append("")
    (out / "train.md").write_text("\n".join(lines))
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(medians, out / "train.svg")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

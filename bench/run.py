#!/usr/bin/env python3
"""Side-by-side benchmark: layerd against the numpy + grpcio peer, in one run.

Starts a release layerd and the peer (the classic numpy Relu/Sigmoid classes
behind the same layerd.v1 contract with grpcio, bench/peers/numpy_server.py),
drives both with layerd-bench with identical settings, and writes
bench/results/report.md (tables, ratios, targets), the raw JSON and the
sweep chart (bench/results/sweep.svg, .png).

    python3 bench/run.py                  # the full run (~15 min on 2 cores)
    python3 bench/run.py --quick          # a smoke run (CI): short, 1 repeat

Needs: cargo, and a Python with numpy and grpcio (the repo's .venv has both).
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
KINDS = ["relu", "sigmoid", "identity"]
SIZES = [1024, 65536, 1048576]
CONCURRENCY = [1, 16]
SWEEP = [16, 256, 4096, 65536, 1048576, 4194304]
SESSIONS_FOR_MEMORY = 10_000


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout.strip()


class Process:
    """A server process that stops on exit."""

    def __init__(self, name, cmd, addr, env=None):
        self.name, self.addr = name, addr
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        host, port = addr.rsplit(":", 1)
        for _ in range(200):
            if self.proc.poll() is not None:
                sys.exit(f"{name} exited: see {self.log.name}")
            try:
                import socket
                socket.create_connection((host, int(port)), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.1)
        sys.exit(f"{name} did not start listening on {addr}")

    def rss_bytes(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench(binary, addr, label, out, *args):
    cmd = [str(binary), "--addr", addr, "--label", label, "--quiet", "--json", str(out), *map(str, args)]
    done = subprocess.run(cmd, text=True, capture_output=True)
    if done.returncode != 0:
        sys.exit(f"layerd-bench failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return json.loads(out.read_text())["runs"]


def start_servers(args, target_dir):
    layerd = Process("layerd", [str(target_dir / "layerd"), "--addr", args.layerd_addr], args.layerd_addr,
                     env={k: v for k, v in os.environ.items() if not k.startswith("LAYERD_")})
    peer = Process("peer", [args.python, str(args.peer), "--addr", args.peer_addr, "--workers", "16"],
                   args.peer_addr)
    return layerd, peer


def matrix(args, binary, servers, tmp):
    """Every (kind, size, concurrency) against both servers, repeats interleaved."""
    runs = []
    for repeat in range(args.repeats):
        for kind in KINDS:
            for size in SIZES:
                for conc in CONCURRENCY:
                    for server in servers:
                        out = tmp / f"{server.name}-{kind}-{size}-{conc}-{repeat}.json"
                        [run] = bench(binary, server.addr, server.name, out, "--mode", "train", "--kind", kind,
                                      "--dtype", "f32", "--elements", size, "--concurrency", conc,
                                      "--duration", args.duration, "--warmup", args.warmup)
                        run["repeat"] = repeat
                        runs.append(run)
                        print(f"  {server.name:6} {kind:8} {size:>8} c{conc:<2} #{repeat}: "
                              f"{run['calls_per_s']:9.0f} calls/s {run['mb_per_s_sent']:8.1f} MB/s", flush=True)
    return runs


def medians(runs):
    table = {}
    for r in runs:
        table.setdefault((r["label"], r["kind"], r["elements"], r["concurrency"]), []).append(r)
    return {key: {"calls_per_s": statistics.median(r["calls_per_s"] for r in rs),
                  "mb_per_s": statistics.median(r["mb_per_s_sent"] for r in rs),
                  "p99": statistics.median(r["latency_us"]["p99"] for r in rs),
                  "n": len(rs)} for key, rs in table.items()}


def memory(args, target_dir, python):
    """RSS per session holding a ReLU layer that kept 1 Ki float32 elements."""
    script = f"""
import sys, numpy as np
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, {str(REPO / 'clients' / 'python' / 'src')!r})
import grpc
from layerd.v1 import layerd_pb2 as pb, layerd_pb2_grpc
stub = layerd_pb2_grpc.LayerServiceStub(grpc.insecure_channel(sys.argv[1]))
x = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1024], data=np.linspace(-1, 1, 1024, dtype=np.float32).tobytes())
def one(i):
    sid = f"mem-{{i}}"
    stub.CreateSession(pb.CreateSessionRequest(session_id=sid, idle_timeout_seconds=3600))
    stub.CreateLayer(pb.CreateLayerRequest(session_id=sid, layer_id="relu", kind="relu"))
    stub.Forward(pb.ForwardRequest(session_id=sid, layer_id="relu", x=x))
with ThreadPoolExecutor(8) as pool:
    list(pool.map(one, range(int(sys.argv[2]))))
"""
    results = {}
    for name, cmd, addr in [
        ("layerd", [str(target_dir / "layerd"), "--addr", args.layerd_addr, "--max-sessions", "20000"], args.layerd_addr),
        ("peer", [args.python, str(args.peer), "--addr", args.peer_addr], args.peer_addr),
    ]:
        server = Process(name, cmd, addr)
        try:
            subprocess.run([python, "-c", script, addr, "100"], check=True)  # warm the code paths
            time.sleep(0.5)
            before = server.rss_bytes()
            subprocess.run([python, "-c", script.replace('f"mem-{i}"', 'f"mem-b{i}"'), addr, str(args.sessions)],
                           check=True)
            time.sleep(0.5)
            after = server.rss_bytes()
        finally:
            server.stop()
        results[name] = {"sessions": args.sessions, "rss_before": before, "rss_after": after,
                         "bytes_per_session": (after - before) / args.sessions}
        print(f"  {name}: {(after - before) / args.sessions:.0f} bytes of RSS per session", flush=True)
    return results


def bench_arguments(doc, duration, quick, extra=None):
    """The options every side-by-side script shares: --quick (one short repeat, with `quick`
    = (duration, warmup)), --repeats, --duration, --warmup, --profile, --out; `extra` adds more."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", default=duration)
    ap.add_argument("--warmup", default="1s")
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    if extra:
        extra(ap)
    args = ap.parse_args()
    if args.quick:
        args.repeats, (args.duration, args.warmup) = 1, quick
    return args


def build(profile):
    """Builds the binaries; returns the directory they are in."""
    subprocess.run(["cargo", "build", "--bins"] + (["--release"] if profile == "release" else []),
                   cwd=REPO, check=True)
    return REPO / "target" / profile


def machine(python):
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")))
    versions = sh(python, "-c", "import numpy, grpc; print(f'numpy {numpy.__version__}, grpcio {grpc.__version__}')")
    return (f"{os.cpu_count()} cores ({cpu}), {mem / 2**20:.0f} GiB, Linux {platform.release()}; "
            f"{sh('rustc', '--version')}; Python {platform.python_version()} with {versions}")


def display(path):
    """A path as a reader can use it: relative to the repository when inside it, else its name
    (results must not carry the paths of the machine they were measured on)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name


def ratio(a, b):
    return a / b if b else float("nan")


def report(args, m, sweep_runs, mem, machine_line, commands):
    out = ["# layerd benchmarks", "",
           f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_line}.", "",
           "Client (layerd-bench) and servers share the 2 cores: every figure includes the client's own cost, "
           "and the peer's figures include Python's GIL and numpy. Mode train (Forward then Backward on one layer, "
           f"every answer verified), float32, closed loop; median of {args.repeats} run(s) of {args.duration} "
           f"after {args.warmup} warm-up, layerd and the peer interleaved.", "",
           "## Calls per second (and MB/s sent)", "",
           "| kind | elements | conc | layerd calls/s | layerd MB/s | peer calls/s | peer MB/s | layerd / peer | layerd p99 us | peer p99 us |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        for size in SIZES:
            for conc in CONCURRENCY:
                l, p = m[("layerd", kind, size, conc)], m[("peer", kind, size, conc)]
                out.append(f"| {kind} | {size} | {conc} | {l['calls_per_s']:.0f} | {l['mb_per_s']:.1f} | "
                           f"{p['calls_per_s']:.0f} | {p['mb_per_s']:.1f} | {ratio(l['calls_per_s'], p['calls_per_s']):.2f}x | "
                           f"{l['p99']:.0f} | {p['p99']:.0f} |")
    out += ["", "## What the layer math costs: kind / identity (layerd)", "",
            "| elements | conc | relu / identity | sigmoid / identity |", "|---:|---:|---:|---:|"]
    for size in SIZES:
        for conc in CONCURRENCY:
            i = m[("layerd", "identity", size, conc)]["calls_per_s"]
            out.append(f"| {size} | {conc} | {ratio(m[('layerd', 'relu', size, conc)]['calls_per_s'], i):.0%} | "
                       f"{ratio(m[('layerd', 'sigmoid', size, conc)]['calls_per_s'], i):.0%} |")

    def target(name, value, goal, fmt):
        return f"| {name} | {fmt.format(value)} | {fmt.format(goal)} | {'met' if value >= goal else 'NOT met'} |"

    t = ["", "## Targets", "", "| target | measured | goal | |", "|---|---:|---:|---|"]
    l, p = (lambda k, s, c: m[("layerd", k, s, c)]["calls_per_s"]), (lambda k, s, c: m[("peer", k, s, c)]["calls_per_s"])
    t.append(target("1 Ki, c16: layerd relu / peer relu", ratio(l("relu", 1024, 16), p("relu", 1024, 16)), 6.0, "{:.2f}x"))
    t.append(target("1 Ki, c16: relu / identity", ratio(l("relu", 1024, 16), l("identity", 1024, 16)), 0.9, "{:.1%}"))
    for conc in CONCURRENCY:
        mb = lambda k: m[("layerd", k, 1048576, conc)]["mb_per_s"]
        t.append(target(f"1 Mi, c{conc}: relu / identity MB/s", ratio(mb("relu"), mb("identity")), 0.9, "{:.1%}"))
        t.append(target(f"1 Mi, c{conc}: sigmoid / identity MB/s", ratio(mb("sigmoid"), mb("identity")), 0.8, "{:.1%}"))
        for kind in ["relu", "sigmoid"]:
            t.append(target(f"1 Mi, c{conc}: layerd {kind} / peer {kind}",
                            ratio(l(kind, 1048576, conc), p(kind, 1048576, conc)), 2.5, "{:.2f}x"))
    out += t
    out += ["", f"## Memory: {mem['layerd']['sessions']} sessions, each a ReLU layer that kept 1 Ki float32", "",
            "| server | RSS before | RSS after | per session |", "|---|---:|---:|---:|"]
    for name, r in mem.items():
        out.append(f"| {name} | {r['rss_before'] / 2**20:.1f} MiB | {r['rss_after'] / 2**20:.1f} MiB | "
                   f"{r['bytes_per_session']:.0f} B |")
    out += ["", "layerd's mask for 1 Ki elements is 128 bytes (1 bit each); the rest of a session's share is its "
            "map entries, ids, layer instance and allocator overhead.", "",
            "## Sweep", "", "![calls/s and p99 against tensor size](sweep.png)", "",
            "Concurrency 16, train mode, float32; the peer's sweep stops at 1 Mi elements.", "", sweep_table(sweep_runs),
            "", "## Commands", "", "```sh", *commands, "```", ""]
    return "\n".join(out)


def sweep_table(runs):
    lines = ["| server | kind | elements | calls/s | MB/s sent | p50 us | p99 us |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['kind']} | {r['elements']} | {r['calls_per_s']:.0f} | "
                     f"{r['mb_per_s_sent']:.1f} | {r['latency_us']['p50']} | {r['latency_us']['p99']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run: 1 repeat, 0.5 s each, small sweep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", default="3s")
    ap.add_argument("--warmup", default="1s")
    ap.add_argument("--sessions", type=int, default=SESSIONS_FOR_MEMORY)
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    venv = REPO / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(venv if venv.exists() else sys.executable),
                    help="a Python with numpy and grpcio, for the peer (default: the repo's .venv, else this one)")
    ap.add_argument("--peer", type=Path, default=REPO / "bench" / "peers" / "numpy_server.py",
                    help="the comparison server (default: the repo's grpcio + numpy peer)")
    ap.add_argument("--layerd-addr", default="127.0.0.1:50151")
    ap.add_argument("--peer-addr", default="127.0.0.1:50551")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration, args.warmup, args.sessions = 1, "500ms", "200ms", 500
    if not args.peer.exists():
        sys.exit(f"peer not found at {args.peer} (pass --peer)")

    print(f"building ({args.profile})", flush=True)
    subprocess.run(["cargo", "build", "--bins"] + (["--release"] if args.profile == "release" else []),
                   cwd=REPO, check=True)
    target_dir = REPO / "target" / args.profile
    binary = target_dir / "layerd-bench"
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="layerd-bench-"))

    servers = start_servers(args, target_dir)
    try:
        print("matrix: train, f32, relu/sigmoid/identity x 1Ki/64Ki/1Mi x c1/c16, both servers", flush=True)
        runs = matrix(args, binary, servers, tmp)
        print("sweep", flush=True)
        sweep_sizes = SWEEP if not args.quick else SWEEP[:3]
        sweep_args = ["--mode", "train", "--dtype", "f32", "--concurrency", 16, "--duration", args.duration,
                      "--warmup", args.warmup]
        sweep_runs = bench(binary, servers[0].addr, "layerd", args.out / "sweep-layerd.json",
                           "--sweep", ",".join(map(str, sweep_sizes)), "--kind", "relu,sigmoid,identity", *sweep_args)
        peer_sizes = [s for s in sweep_sizes if s <= 1048576]
        sweep_runs += bench(binary, servers[1].addr, "peer", args.out / "sweep-peer.json",
                            "--sweep", ",".join(map(str, peer_sizes)), "--kind", "relu,sigmoid", *sweep_args)
    finally:
        for server in servers:
            server.stop()
    subprocess.run([str(binary), "chart", str(args.out / "sweep-layerd.json"), str(args.out / "sweep-peer.json"),
                    "--out", str(args.out / "sweep")], check=True)
    print("memory", flush=True)
    mem = memory(args, target_dir, args.python)

    (args.out / "matrix.json").write_text(json.dumps(runs, indent=1))
    commands = [f"python3 bench/run.py{' --quick' if args.quick else ''}  # all of the below, then this report",
                f"target/{args.profile}/layerd --addr {args.layerd_addr}",
                f"python {display(args.peer)} --addr {args.peer_addr} --workers 16",
                f"target/{args.profile}/layerd-bench --addr ADDR --mode train --dtype f32 --kind KIND --elements N "
                f"--concurrency C --duration {args.duration} --warmup {args.warmup} --json out.json"]
    text = report(args, medians(runs), sweep_runs, mem, machine(args.python), commands)
    (args.out / "report.md").write_text(text)
    print(f"\nwrote {args.out / 'report.md'}, {args.out / 'sweep.svg'} and .png\n")
    print(text[text.index("## Calls"):text.index("## Memory")])


if __name__ == "__main__":
    main()

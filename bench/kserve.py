#!/usr/bin/env python3
"""KServe v2 / Triton protocol benchmark: Triton's perf_analyzer and layerd-bench
(--protocol kserve, a Rust client that checks every answer) against layerd, Triton
Inference Server and a grpcio + numpy KServe server, side by side, with tensors in
the messages and in system shared memory.

Each repeat runs every case against every server in turn (interleaved, so
slow drift of this shared machine spreads over all of them); the report gives
medians of infer/s and p99, the ratios against the targets, and the CPU that
the client itself and each server used.

    python3 bench/kserve.py                 # full run (~12 min), writes bench/results/kserve.md
    python3 bench/kserve.py --quick --peers numpy --out DIR   # smoke run, no Triton (CI)

Needs perf_analyzer (bash bench/perf_analyzer/install.sh) and, for --peers all,
Triton Inference Server from PyPI (bash bench/peers/triton/setup.sh: the
nvidia-pytriton wheel's CPU server and Python backend, in .venv-triton; run here
if missing). The grpcio + numpy KServe peer is bench/peers/kserve_numpy_server.py.
"""
import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, RESULTS, Process, bench, build, display, machine  # noqa: E402

PEERS = REPO / "bench" / "peers"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (case, perf_analyzer shape, concurrencies, stateful, shared memory): stateless
# cases go to each server's `relu`, sequence cases to its stateful ReLU; shared-memory
# cases (`--shared-memory system`) to the servers that serve the extension.
# One perf_analyzer run per row, so each row's CPU shares are its own.
CASES = [
    ("1 Ki", "x:1024", "1", False, False),
    ("1 Ki", "x:1024", "8", False, False),
    ("1 Mi", "x:1048576", "1", False, False),
    ("1 Mi", "x:1048576", "8", False, False),
    ("sequence, 1 Ki, 5 per sequence", "x:1024", "8", True, False),
    ("shm, 1 Ki", "x:1024", "8", False, True),
    ("shm, 1 Mi", "x:1048576", "8", False, True),
]
# layerd-bench --protocol kserve cases: (case, elements, concurrency, --shared-memory,
# sequence length or 0, connections). Stateless ones go to each server's stateless ReLU (and
# layerd's identity floor), the sequence one (Forward only, as Triton's relu_seq has no
# Backward) to its stateful ReLU. The concurrency is the calls in flight over all connections.
# perf_analyzer 2.60 shares a connection among at most 6 of its clients, one of which reads
# metadata: it opens 1 connection at concurrency 1, 2 at 6 and 8, 3 at 12 (counted with `ss`).
# The "2 connections" case is its arrangement at 8; the others keep every call on one.
BENCH_CASES = [
    ("1 Mi", 1048576, 8, "none", 0, 1),
    ("1 Mi, 2 connections", 1048576, 8, "none", 0, 2),
    ("shm, 1 Mi", 1048576, 8, "system", 0, 1),
    ("16 Mi", 16777216, 4, "none", 0, 1),
    ("shm, 16 Mi", 16777216, 4, "system", 0, 1),
    ("sequence, 1 Mi, 5 per sequence", 1048576, 8, "none", 5, 1),
]
# perf_analyzer 2.60 keeps every request's records until it exits: at 1 Mi its
# RSS grows by ~15 MB per request and, against a server answering ~100/s, its
# windowed measurement stalls and is killed for lack of memory (24 GiB here).
# So 1 Mi runs send a fixed number of requests, measured once.
LARGE_WINDOWS = ["--request-count", "500", "--warmup-request-count", "50"]


class Server:
    def __init__(self, name, addr, models, pid_of, stop):
        self.name, self.addr, self.models, self.pid_of, self.stop = name, addr, models, pid_of, stop
        # Serves Triton's system shared-memory extension.
        self.shm = False

    def cpu_seconds(self):
        """CPU time of the server and every process under it (Triton's Python backend stubs)."""
        root = self.pid_of()
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                parents[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
            except (OSError, IndexError, ValueError):
                pass

        def under(pid):
            while pid > 1:
                if pid == root:
                    return True
                pid = parents.get(pid, (0, 0))[0]
            return False

        return sum(ticks for pid, (_, ticks) in parents.items() if under(pid)) / CLK_TCK


def start_layerd(args, binary):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERD_")}
    # 16 Mi float32 is 64 MiB: the message limit must be above it.
    p = Process("layerd", [str(binary), "--addr", args.layerd_addr, "--allow-client-shm",
                           "--max-message-bytes", "80MiB"], args.layerd_addr, env=env)
    server = Server("layerd", args.layerd_addr,
                    {"stateless": "relu_no_grad", "sequence": "relu", "floor": "identity_no_grad"},
                    lambda: p.proc.pid, p.stop)
    server.shm = True
    return server


def start_triton(args, port, run_dir):
    subprocess.run(["bash", str(PEERS / "triton" / "start.sh"), str(port), str(run_dir), str(args.triton_venv)],
                   check=True)
    pid = int((run_dir / "triton.pid").read_text())

    def stop():
        subprocess.run(["kill", str(pid)], check=False)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)

    server = Server("triton", f"127.0.0.1:{port}", {"stateless": "relu", "sequence": "relu_seq"}, lambda: pid, stop)
    server.shm = True  # Triton 2.51 serves it without a flag
    return server


def start_kserve_numpy(port):
    addr = f"127.0.0.1:{port}"
    p = Process("grpc_numpy", [sys.executable, str(PEERS / "kserve_numpy_server.py"), "--addr", addr,
                               "--workers", "8"], addr)
    return Server("grpc_numpy", addr, {"stateless": "relu", "sequence": "relu_seq"}, lambda: p.proc.pid, p.stop)


def client_cpu(server, run):
    """Runs `run()` (which runs one client process to its end); returns its result, the wall
    time, and the CPU seconds the client and the server used. The client is the only child
    reaped meanwhile, so the change in the children's CPU time is its own."""
    server_cpu = server.cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = run()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return result, wall, used, server.cpu_seconds() - server_cpu


def layerd_bench(args, binary, server, model, case, elements, concurrency, shm, sequence, tmp, tag,
                 connections=1):
    """One verifying layerd-bench --protocol kserve run of `model` against `server`;
    `concurrency` calls in flight, spread evenly over `connections`."""
    # The kind layerd-bench checks every answer against: the floor's is identity.
    kind = "identity" if model == server.models.get("floor") else "relu"
    flags = ["--protocol", "kserve", "--mode", "forward", "--kind", kind, "--model", model, "--elements", elements,
             "--connections", connections, "--concurrency", concurrency // connections,
             "--shared-memory", shm, "--duration", args.bench_duration, "--warmup", args.bench_warmup]
    if sequence:
        flags += ["--sequence-length", sequence]
    (run,), wall, client_s, server_s = client_cpu(
        server, lambda: bench(binary, server.addr, server.name, tmp / f"{tag}.json", *flags))
    assert run["mismatches"] == 0 and not run["errors"], run
    return {"server": server.name, "model": model, "case": case, "client": "layerd-bench",
            "concurrency": concurrency, "infer_per_s": run["calls_per_s"],
            "p99_us": run["latency_us"]["p99"], "wall_s": wall, "server_us": 0,
            "pa_cpu_s": client_s, "server_cpu_s": server_s,
            "command": " ".join(map(str, [display(binary), "--addr", server.addr, "--label", server.name,
                                          *flags]))}


def perf_analyzer(args, server, model, shape, concurrency, stateful, shm, tmp, tag):
    """One perf_analyzer run; its CSV rows plus the CPU it and the server used."""
    out = tmp / f"{tag}.csv"
    windows = LARGE_WINDOWS if shape == "x:1048576" else ["-p", str(args.window_ms), "-r", "10"]
    stability = "25"
    if args.quick:
        # A fixed count needs no stable windows, which a short run on a busy machine may lack.
        windows = ["--request-count", "20" if shape == "x:1048576" else "300"]
        if stateful:
            # Not for sequences: when perf_analyzer (2.60) reaches the count it ends the
            # sequences in flight early, then sends them one more request without a start
            # flag, which a sequence server must refuse (layerd: NOT_FOUND, its session is
            # closed; Triton: START missing). Short time windows do not do that. A smoke
            # run's figures mean nothing, so any three windows in a row will do: a
            # Python peer's rate swings by more than 25 % between windows on a busy
            # machine, and perf_analyzer then gives up (exit 2).
            windows = ["-p", "1000", "-r", "20"]
            stability = "100"
    cmd = [args.perf_analyzer, "-i", "grpc", "--service-kind=triton", "-u", server.addr, "-m", model,
           "--shape", shape, "--concurrency-range", concurrency, "-s", stability, *windows, "-f", str(out)]
    if stateful:
        cmd += ["--sequence-length", "5", "--sequence-length-variation", "0"]
    if shm:
        # Output regions of the input's size (float32 in, float32 out).
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(4 * int(shape.split(":")[1]))]
    run, wall, pa_cpu, server_cpu = client_cpu(
        server, lambda: subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    if run.returncode != 0:
        sys.exit(f"perf_analyzer failed ({run.returncode}): {' '.join(cmd)}\n{run.stdout}")
    with out.open() as f:
        rows = list(csv.DictReader(f))
    return [{"server": server.name, "model": model, "shape": shape, "stateful": stateful, "client": "perf_analyzer",
             "concurrency": int(r["Concurrency"]), "infer_per_s": float(r["Inferences/Second"]),
             "p99_us": float(r["p99 latency"]), "wall_s": wall,
             # Only servers with ModelStatistics report these.
             "server_us": sum(float(r.get(c) or 0) for c in ("Server Queue", "Server Compute Input",
                                                             "Server Compute Infer", "Server Compute Output")), "pa_cpu_s": pa_cpu, "server_cpu_s": server_cpu,
             # As a reader runs it: no paths of this machine.
             "command": " ".join([display(cmd[0])] + [f"OUT/{out.name}" if a == str(out) else a for a in cmd[1:]])}
            for r in rows]


def variants_of(server, stateful):
    """(label, model) pairs to run on `server`: its ReLU, and for a stateless case its no-math
    floor where it has one (layerd's identity: what the same path costs without the layer)."""
    variants = [(server.name, server.models["sequence" if stateful else "stateless"])]
    if "floor" in server.models and not stateful:
        variants.append((f"{server.name} identity", server.models["floor"]))
    return variants


def median_table(runs):
    table = {}
    for r in runs:
        table.setdefault((r["case"], r["server"], r["concurrency"]), []).append(r)
    return {k: {"infer_per_s": statistics.median(r["infer_per_s"] for r in rs),
                "p99_us": statistics.median(r["p99_us"] for r in rs),
                "server_us": statistics.median(r["server_us"] for r in rs),
                "pa_share": statistics.median(r["pa_cpu_s"] / (r["wall_s"] * os.cpu_count()) for r in rs),
                "server_share": statistics.median(r["server_cpu_s"] / (r["wall_s"] * os.cpu_count()) for r in rs),
                "n": len(rs), "model": rs[0]["model"]} for k, rs in table.items()}


def rate_ratio(a, b):
    """a's infer/s over b's; None where either is missing or b completed no call in its window
    (a 16 Mi case in a short smoke run of a debug build may not)."""
    if not a or not b or not b["infer_per_s"]:
        return None
    return a["infer_per_s"] / b["infer_per_s"]


def rate(per_s):
    """A rate as the table shows it: tenths below 100/s (the 16 Mi rows)."""
    return f"{per_s:.1f}" if per_s < 100 else f"{per_s:.0f}"


def table(m, order):
    """The rows of one client's table: per case and concurrency, each server's medians."""
    names = [s for s in ["layerd", "layerd identity", "triton", "grpc_numpy"] if any(k[1] == s for k in m)]
    out = ["| case | conc | " + " | ".join(f"{n} infer/s | {n} p99 us" for n in names) +
           " | layerd / triton | layerd / grpc_numpy | client CPU (layerd run) | client CPU "
           "(triton run) | layerd CPU | triton CPU | layerd server us | triton server us |",
           "|---|---:|" + "---:|---:|" * len(names) + "---:|" * 8]
    rows = sorted({(k[0], k[2]) for k in m}, key=lambda ck: (order.index(ck[0]), ck[1]))
    for case, conc in rows:
        cells = []
        for n in names:
            v = m.get((case, n, conc))
            cells += [rate(v["infer_per_s"]), f"{v['p99_us']:.0f}"] if v else ["", ""]
        l, t, g = (m.get((case, n, conc)) for n in ("layerd", "triton", "grpc_numpy"))
        ratio = lambda a, b: f"{r:.2f}x" if (r := rate_ratio(a, b)) is not None else ""  # noqa: E731
        share = lambda v, key: f"{v[key]:.0%}" if v else ""  # noqa: E731
        us = lambda v: f"{v['server_us']:.0f}" if v and v["server_us"] else ""  # noqa: E731
        out.append(f"| {case} | {conc} | " + " | ".join(cells) +
                   f" | {ratio(l, t)} | {ratio(l, g)} | {share(l, 'pa_share')} | {share(t, 'pa_share')} | "
                   f"{share(l, 'server_share')} | {share(t, 'server_share')} | {us(l)} | {us(t)} |")
    return out


def report(args, m, mb, machine_line, commands):
    out = ["# KServe v2 / Triton protocol: layerd, Triton and a grpcio + numpy server, "
           "through perf_analyzer and layerd-bench", "",
           f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_line}.", "",
           f"The client shares the {os.cpu_count()} cores with the server it measures. Medians of "
           f"{args.repeats} repeat(s), servers interleaved. CPU columns: the share of the machine's CPU time (all "
           "cores) that the client and the server (with its child processes) used over the whole client run. "
           "`server us`: the time per request the server itself reports in ModelStatistics (queue + compute "
           "input, infer, output), as perf_analyzer prints it.", "",
           "- layerd: `relu_no_grad` (stateless) and, for the sequence cases, `relu` (each sequence a session; "
           "every Forward keeps the ReLU mask); `layerd identity` is `identity_no_grad`, the no-math floor of "
           "the same path. Started with `--allow-client-shm --max-message-bytes 80MiB`.",
           "- triton: Triton Inference Server 2.51 (from the nvidia-pytriton wheel), Python backend, numpy ReLU; "
           "`relu` (stateless), `relu_seq` (sequence_batching, one mask per sequence) for the sequence cases; "
           "it serves system shared memory without a flag.",
           "- grpc_numpy: a grpcio + numpy server of the same protocol (`relu`, `relu_seq`; 8 worker threads; "
           "no shared memory).", "",
           "## perf_analyzer", "",
           f"gRPC, float32 ReLU, async; {args.window_ms} ms windows stable within 25 %; 1 Mi: 500 requests after "
           "50 warm-up, measured once (perf_analyzer 2.60 keeps every request's buffers). `shm` cases: "
           "`--shared-memory system` (inputs and outputs in regions perf_analyzer registers).", "",
           *table(m, [c[0] for c in CASES]), "",
           "## layerd-bench --protocol kserve", "",
           f"The Rust load generator (`--mode forward`, {args.bench_duration} measured after {args.bench_warmup} "
           "warm-up), which checks every answer bit for bit against its own ReLU (identity for the floor), "
           "with the tensors in the messages (written and read by `layerd::kserve::wire`, without tonic's "
           "codec copies; HTTP/2 frames "
           "of up to 16 MiB, so a 4 MiB answer arrives in one frame and is checked where it landed) or "
           "(`shm`) in two shared-memory objects per worker that it registers (x written once; "
           "y checked in place in its read-only mapping). layerd computes a stateless call in one pass "
           "from where its input is (the request's frames, or a region read in 256 KiB chunks) to where its "
           "output goes. Before the first repeat every server serves 16 Mi requests for one run's time: "
           "Triton answers 1 Mi requests about 1.5x faster once it has served 16 Mi ones. Calls share one "
           "connection, but in `2 connections` (4 calls in flight on each), the arrangement perf_analyzer "
           "2.60 uses at concurrency 8: its clients share a connection, at most 6 on one, and it opens "
           "1 at concurrency 1, 2 at 6 and 8, 3 at 12 (counted with `ss`).", "",
           *table(mb, [c[0] for c in BENCH_CASES])]

    targets = [("perf_analyzer", m, "1 Ki, c8: layerd / Triton", ("1 Ki", 8), 2.5),
               ("perf_analyzer", m, "1 Mi, c8: layerd / Triton", ("1 Mi", 8), 2.0),
               ("perf_analyzer", m, "1 Mi, c1: layerd / Triton", ("1 Mi", 1), 2.0),
               ("perf_analyzer", m, "sequence, c8: layerd / Triton relu_seq",
                ("sequence, 1 Ki, 5 per sequence", 8), 2.0),
               ("perf_analyzer", m, "shm, 1 Mi, c8: layerd / Triton", ("shm, 1 Mi", 8), 3.0),
               ("layerd-bench", mb, "1 Mi, c8: layerd / Triton", ("1 Mi", 8), 3.0),
               ("layerd-bench", mb, "1 Mi, c8 on 2 connections (perf_analyzer's): layerd / Triton",
                ("1 Mi, 2 connections", 8), 3.0),
               ("layerd-bench", mb, "shm, 1 Mi, c8: layerd / Triton", ("shm, 1 Mi", 8), 3.0)]
    lines = []
    for client, table_m, label, (case, conc), goal in targets:
        l, t = table_m.get((case, "layerd", conc)), table_m.get((case, "triton", conc))
        if (r := rate_ratio(l, t)) is not None:
            lines.append(f"| {client}: {label} | {r:.2f}x | {goal:.1f}x | {'met' if r >= goal else 'NOT met'} |")
    shm, plain = mb.get(("shm, 16 Mi", "layerd", 4)), mb.get(("16 Mi", "layerd", 4))
    if (r := rate_ratio(shm, plain)) is not None:
        lines.append(f"| layerd-bench: 16 Mi, c4: layerd with shared memory / without | {r:.2f}x | 3.0x | "
                     f"{'met' if r >= 3.0 else 'NOT met'} |")
    if lines:
        out += ["", "## Targets", "", "| target | measured | goal | |", "|---|---:|---:|---|", *lines]
    out += ["", "## Commands", "", "```sh", *commands, "```", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, short windows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window-ms", type=int, default=3000)
    ap.add_argument("--peers", choices=["all", "numpy", "none"], default="all",
                    help="all: Triton and the grpcio + numpy peer; numpy: only the latter; none: layerd only")
    ap.add_argument("--triton-venv", type=Path, default=REPO / ".venv-triton",
                    help="where bench/peers/triton/setup.sh installed Triton")
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    ap.add_argument("--perf-analyzer", default=str(REPO / ".venv" / "bin" / "perf_analyzer"))
    ap.add_argument("--layerd-addr", default="127.0.0.1:50161")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--bench-duration", default="5s", help="layerd-bench's measured time per case")
    ap.add_argument("--bench-warmup", default="1s")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.window_ms = 1, 500
        args.bench_duration, args.bench_warmup = "1s", "200ms"
    if not Path(args.perf_analyzer).exists():
        sys.exit(f"perf_analyzer not found at {args.perf_analyzer}: bash bench/perf_analyzer/install.sh")

    print(f"building ({args.profile})", flush=True)
    target = build(args.profile)
    if args.peers == "all":
        subprocess.run(["bash", str(PEERS / "triton" / "setup.sh"), str(args.triton_venv)], check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="layerd-kserve-"))

    servers = [start_layerd(args, target / "layerd")]
    try:
        if args.peers == "all":
            servers.append(start_triton(args, 18201, tmp / "triton"))
        if args.peers in ("all", "numpy"):
            servers.append(start_kserve_numpy(18101))
        runs, bench_runs = [], []
        for repeat in range(args.repeats):
            for case, shape, concurrency, stateful, shm in CASES:
                for server in servers:
                    if shm and not server.shm:
                        continue
                    for label, model in variants_of(server, stateful):
                        tag = f"{label}-{case}-c{concurrency}-{repeat}".replace(" ", "_").replace(",", "")
                        for r in perf_analyzer(args, server, model, shape, concurrency, stateful, shm, tmp, tag):
                            r.update(case=case, server=label, repeat=repeat)
                            runs.append(r)
                            print(f"  #{repeat} {case:32} {label:16} c{r['concurrency']}: "
                                  f"{r['infer_per_s']:9.1f} infer/s p99 {r['p99_us']:8.0f} us "
                                  f"(perf_analyzer CPU {r['pa_cpu_s'] / (r['wall_s'] * os.cpu_count()):.0%})",
                                  flush=True)
            # layerd-bench: layerd against Triton (the grpcio peer is perf_analyzer's baseline).
            if repeat == 0:
                # Triton answers 1 Mi tensors about 1.5x faster (80 -> 120 infer/s here) once it
                # has served 16 Mi ones, and stays so; a pre-sized Python-backend shm pool does not
                # do it. Every server serves a few first, so each repeat measures warm servers.
                for server in servers:
                    if server.name != "grpc_numpy":
                        layerd_bench(args, target / "layerd-bench", server, server.models["stateless"],
                                     "warm-up", 16777216, 4, "none", 0, tmp, f"warm-up-{server.name}")
            for case, elements, concurrency, shm, sequence, connections in BENCH_CASES:
                for server in servers:
                    if server.name == "grpc_numpy" or (shm == "system" and not server.shm):
                        continue
                    for label, model in variants_of(server, sequence):
                        tag = f"bench-{label}-{case}-{repeat}".replace(" ", "_").replace(",", "")
                        r = layerd_bench(args, target / "layerd-bench", server, model, case, elements,
                                         concurrency, shm, sequence, tmp, tag, connections)
                        r.update(server=label, repeat=repeat)
                        bench_runs.append(r)
                        print(f"  #{repeat} {case:32} {label:16} c{concurrency}: {r['infer_per_s']:9.1f} "
                              f"infer/s p99 {r['p99_us']:8.0f} us (layerd-bench, verified; client CPU "
                              f"{r['pa_cpu_s'] / (r['wall_s'] * os.cpu_count()):.0%})", flush=True)
    finally:
        for server in servers:
            server.stop()

    (args.out / "kserve.json").write_text(json.dumps(runs + bench_runs, indent=1))
    commands = [f"python3 bench/kserve.py{' --quick' if args.quick else ''}"
                f"{'' if args.peers == 'all' else ' --peers ' + args.peers}  # all of the below, then this report",
                f"target/{args.profile}/layerd --addr {args.layerd_addr} --allow-client-shm --max-message-bytes 80MiB",
                "bash bench/peers/triton/setup.sh && bash bench/peers/triton/start.sh 18201 RUN_DIR",
                "python bench/peers/kserve_numpy_server.py --addr 127.0.0.1:18101 --workers 8",
                *sorted({r["command"] for r in runs + bench_runs if r["repeat"] == 0})]
    text = report(args, median_table(runs), median_table(bench_runs),
                  machine(str(REPO / ".venv" / "bin" / "python")), commands)
    (args.out / "kserve.md").write_text(text)
    print(f"\nwrote {args.out / 'kserve.md'}\n")
    print(text[:text.index("## Commands")])


if __name__ == "__main__":
    main()

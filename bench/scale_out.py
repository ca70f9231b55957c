#!/usr/bin/env python3
"""Scale-out benchmark: calls/s of a verifying layerd-bench train run straight at
one layerd replica, and through nginx and haproxy (deploy/'s configurations) in
front of three, at 1 Ki and 1 Mi float32 elements. Everything shares this
machine's cores, so the ratios say what each proxy hop costs, not what three
machines would add.

    python3 bench/scale_out.py            # ~3 min; writes bench/results/scale_out.md and .json
    python3 bench/scale_out.py --quick --profile debug --out DIR   # smoke run

Needs nginx and haproxy (apt install nginx-light haproxy).
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerd_server  # noqa: E402
from run import REPO, bench_arguments, build, machine  # noqa: E402

SIZES = [1024, 1048576]


def bench(binary, addr, label, size, args, tmp):
    out = tmp / f"{label}-{size}-{time.monotonic_ns()}.json"
    cmd = [str(binary), "--addr", addr, "--label", label, "--mode", "train", "--kind", "relu", "--dtype", "f32",
           "--elements", str(size), "--concurrency", str(args.concurrency), "--duration", args.duration,
           "--warmup", args.warmup, "--session-header", "--quiet", "--json", str(out)]
    if args.quick:
        # The smoke run checks that the script works end to end; its failed calls are printed,
        # not fatal (a full run still requires none).
        cmd.insert(-2, "--allow-errors")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"layerd-bench failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    [run] = json.loads(out.read_text())["runs"]
    return run, " ".join(cmd[:-2]).replace(str(REPO) + "/", "")


def main():
    args = bench_arguments(__doc__, "3s", ("500ms", "200ms"),
                           lambda ap: ap.add_argument("--concurrency", type=int, default=16))
    target = build(args.profile)
    layerd_server.BINARY = target / "layerd"
    from cluster import Cluster, Proxy  # after BINARY is set: replicas run this build

    tmp = Path(tempfile.mkdtemp(prefix="layerd-scale-"))
    cluster = Cluster()
    proxies = []
    runs, commands = [], set()
    try:
        proxies = [Proxy("nginx", cluster.backends()), Proxy("haproxy", cluster.backends())]
        routes = [("direct", cluster.replicas[0].addr)] + [(k, p.addr) for k, p in zip(["nginx", "haproxy"], proxies)]
        for repeat in range(args.repeats):
            for size in SIZES:
                for label, addr in routes:
                    run, command = bench(target / "layerd-bench", addr, label, size, args, tmp)
                    assert run["mismatches"] == 0, run
                    if run["errors"]:
                        assert args.quick, run
                        print(f"  #{repeat} {label:8} {size:>8}: failed calls {run['errors']}: "
                              f"{run['error_examples']}", flush=True)
                    commands.add(command)
                    run.update(route=label, size=size, repeat=repeat)
                    runs.append(run)
                    print(f"  #{repeat} {label:8} {size:>8}: {run['calls_per_s']:9.0f} calls/s "
                          f"p99 {run['latency_us']['p99']} us", flush=True)
    finally:
        for p in proxies:
            p.stop()
        cluster.stop()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_out.json").write_text(json.dumps(runs, indent=1))
    med = {(r, s): statistics.median(x["calls_per_s"] for x in runs if x["route"] == r and x["size"] == s)
           for r in ("direct", "nginx", "haproxy") for s in SIZES}
    p99 = {(r, s): statistics.median(x["latency_us"]["p99"] for x in runs if x["route"] == r and x["size"] == s)
           for r in ("direct", "nginx", "haproxy") for s in SIZES}
    lines = ["# Scale-out: straight at layerd, and through nginx and haproxy", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine(str(REPO / '.venv' / 'bin' / 'python'))}.",
             "", f"layerd-bench train (Forward + Backward, every answer verified), relu, float32, concurrency "
             f"{args.concurrency} on one connection, `--session-header`; median of {args.repeats} run(s) of "
             f"{args.duration}. direct: one replica; nginx / haproxy: deploy/'s configurations in front of three "
             "replicas, each session pinned by x-session-id. Client, proxy and replicas share the machine.", "",
             "| elements | direct calls/s | nginx calls/s | haproxy calls/s | nginx / direct | haproxy / direct | p99 us direct / nginx / haproxy |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SIZES:
        d, n, h = med[("direct", s)], med[("nginx", s)], med[("haproxy", s)]
        lines.append(f"| {s} | {d:,.0f} | {n:,.0f} | {h:,.0f} | {n / d:.0%} | {h / d:.0%} | "
                     f"{p99[('direct', s)]:,.0f} / {p99[('nginx', s)]:,.0f} / {p99[('haproxy', s)]:,.0f} |")
    lines += ["", "## Commands", "", "```sh", f"python3 bench/scale_out.py{' --quick' if args.quick else ''}",
              *sorted(commands), "```", ""]
    (args.out / "scale_out.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

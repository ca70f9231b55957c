#!/usr/bin/env python3
"""Overload: what a layerd with --max-concurrent-calls does when offered twice what it can serve.

First its capacity: a closed-loop layerd-bench run with as many calls in flight as the limit.
Then an open-loop run offering 2x that rate from 16x as many workers, so calls beyond the limit
arrive: they must be shed at once (UNAVAILABLE, reason OVERLOADED), the accepted ones keep a
bounded p99, nothing else fails, and the server's memory stays bounded. The server runs on one
core and layerd-bench on the other: sharing both, the client could not offer twice what the
server serves.

    python3 bench/overload.py            # ~1 min; writes bench/results/overload.md and .json
    python3 bench/overload.py --quick --profile debug --out DIR   # smoke run (CI)
"""
import json
import os
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

LIMIT = 8
# The server gets one core and the load generator the other, so the client
# can offer more than the server can serve (sharing both, it could not).
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPUS, CLIENT_CPUS = ({_CPUS[0]}, {_CPUS[1]}) if len(_CPUS) >= 2 else (None, None)
# 64 Ki elements: computed on the blocking pool, 256 KiB each way per call.
WORKLOAD = ["--mode", "forward", "--kind", "sigmoid", "--dtype", "f32", "--elements", "65536"]


def bench(binary, addr, extra, tmp, duration, warmup):
    out = tmp / f"run-{time.monotonic_ns()}.json"
    cmd = [str(binary), "--addr", addr, *WORKLOAD, *extra, "--duration", duration, "--warmup", warmup,
           "--allow-errors", "--quiet", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=lambda: CLIENT_CPUS and os.sched_setaffinity(0, CLIENT_CPUS))
    if done.returncode != 0:
        sys.exit(f"layerd-bench failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    [run] = json.loads(out.read_text())["runs"]
    return run, " ".join(cmd[:-2]).replace(str(REPO) + "/", "")


def measure(target, repeats=3, duration="5s", warmup="1s", tmp=None, flags=()):
    """Capacity and 2x-capacity runs against one server started with `flags`; returns
    (rows, commands, server figures)."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="layerd-overload-"))
    layerd_server.BINARY = target / "layerd"
    server = layerd_server.Server(f"--max-concurrent-calls={LIMIT}", "--metrics-addr=127.0.0.1:0", *flags,
                                  cpus=SERVER_CPUS)
    rows, commands = [], []
    try:
        rss_idle = server.rss_mib()
        sampler = layerd_server.RssPeak(server)
        for repeat in range(repeats):
            capacity, command = bench(target / "layerd-bench", server.addr,
                                      ["--connections", "2", "--concurrency", str(LIMIT // 2)], tmp, duration, warmup)
            commands.append(command)
            assert not capacity["errors"] and capacity["mismatches"] == 0, capacity
            offered = 2 * capacity["calls_per_s"]
            overload, command = bench(target / "layerd-bench", server.addr,
                                      ["--connections", "8", "--concurrency", str(2 * LIMIT), "--rate", f"{offered:.0f}"],
                                      tmp, duration, warmup)
            commands.append(command)
            shed = overload["errors"].get("Unavailable", 0)
            answered = overload["calls"] + sum(overload["errors"].values())
            rows.append({
                "repeat": repeat,
                "capacity_calls_per_s": capacity["calls_per_s"],
                "capacity_p99_us": capacity["latency_us"]["p99"],
                "offered_calls_per_s": offered,
                "answered_calls_per_s": answered / overload["seconds"],
                "accepted_calls_per_s": overload["calls_per_s"],
                "shed_fraction": shed / answered if answered else 0.0,
                "accepted_p99_us": overload["latency_us"]["p99"],
                "shed_p99_us": overload["error_latency_us"]["p99"],
                "errors": overload["errors"],
                "error_examples": overload["error_examples"],
                "mismatches": overload["mismatches"],
            })
            print(f"  #{repeat}: capacity {capacity['calls_per_s']:.0f}/s p99 {capacity['latency_us']['p99']} us; "
                  f"offered {offered:.0f}/s -> accepted {overload['calls_per_s']:.0f}/s "
                  f"p99 {overload['latency_us']['p99']} us, shed {rows[-1]['shed_fraction']:.1%} "
                  f"p99 {overload['error_latency_us']['p99']} us, errors {overload['errors']}", flush=True)
        rss_peak = sampler.stop()
        metrics = server.metrics()
        figures = {
            "rss_idle_mib": rss_idle,
            "rss_peak_mib": rss_peak,
            "shed_total": metrics.get(("layerd_calls_shed_total", ()), 0.0),
            "in_flight_after": metrics.get(("layerd_calls_in_flight", ()), 0.0),
            "alive": server.proc.poll() is None,
        }
    finally:
        code = server.stop()
    figures["exit_code"] = code
    figures["panics"] = sum("panicked" in line for line in server.log)
    return rows, commands, figures


def median(rows, key):
    return statistics.median(row[key] for row in rows)


# The default 4 MiB stream window lets a client upload a whole 256 KiB request
# before the server has looked at it, shed or not; a 64 KiB window caps what
# a shed call makes the server read (at some cost to large-tensor speed); an
# adaptive window starts at 64 KiB and grows with the measured BDP.
CONFIGS = [("default", []), ("--initial-stream-window=64KiB", ["--initial-stream-window=64KiB"]),
           ("--http2-adaptive-window", ["--http2-adaptive-window"])]


def main():
    args = bench_arguments(__doc__, "5s", ("1s", "300ms"))
    target = build(args.profile)
    results, commands = {}, []
    for name, flags in CONFIGS:
        print(f"server: {name}", flush=True)
        rows, run_commands, figures = measure(target, args.repeats, args.duration, args.warmup, flags=flags)
        results[name] = {"rows": rows, "server": figures}
        commands += run_commands
        assert figures["alive"] and figures["panics"] == 0, figures

    result = {"machine": machine(sys.executable), "profile": args.profile, "limit": LIMIT,
              "workload": " ".join(WORKLOAD), "configs": results, "commands": sorted(set(commands))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(result, indent=2) + "\n")

    def row(label, fmt, key):
        return f"| {label} | " + " | ".join(fmt.format(median(r["rows"], key)) for r in results.values()) + " |"

    def codes(r):
        return ", ".join(sorted({c for x in r["rows"] for c in x["errors"]})) or "none"

    lines = [
        "# Overload: 2x capacity against `--max-concurrent-calls`",
        "",
        f"`python3 bench/overload.py` ({args.profile}, {args.repeats} repeats of {args.duration} per server, "
        f"medians; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine(sys.executable)}).",
        f"Server `layerd --max-concurrent-calls={LIMIT}` pinned to one core, layerd-bench to the other; "
        f"workload `{' '.join(WORKLOAD)}`. Capacity: closed loop with {LIMIT} calls in flight. Overload: "
        f"open loop at twice that rate from {16 * LIMIT} workers on 8 connections.",
        "",
        "| figure | " + " | ".join(f"`{name}`" if name != "default" else "defaults" for name in results) + " |",
        "|---|" + "---:|" * len(results),
        row("capacity", "{:,.0f} calls/s", "capacity_calls_per_s"),
        row("capacity p99", "{:,.0f} µs", "capacity_p99_us"),
        row("offered (2x capacity)", "{:,.0f} calls/s", "offered_calls_per_s"),
        row("answered (accepted + shed)", "{:,.0f} calls/s", "answered_calls_per_s"),
        row("accepted", "{:,.0f} calls/s", "accepted_calls_per_s"),
        row("shed fraction (UNAVAILABLE, OVERLOADED)", "{:.1%}", "shed_fraction"),
        row("accepted p99", "{:,.0f} µs", "accepted_p99_us"),
        row("shed p99", "{:,.0f} µs", "shed_p99_us"),
        "| error codes seen | " + " | ".join(codes(r) for r in results.values()) + " |",
        "| server RSS idle → peak | " + " | ".join(
            f"{r['server']['rss_idle_mib']:.0f} → {r['server']['rss_peak_mib']:.0f} MiB" for r in results.values()) + " |",
        "| server alive, panics | " + " | ".join(
            f"{r['server']['alive']}, {r['server']['panics']}" for r in results.values()) + " |",
        "",
        "Latency is measured from each call's scheduled send time, so client-side queueing is included.",
        "",
        "Commands (the server's address varies):",
        "",
        *[f"    {c}" for c in sorted(set(commands))],
        "",
    ]
    (args.out / "overload.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

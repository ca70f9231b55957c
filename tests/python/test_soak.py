"""Soak: sustained session churn — sessions created, used, then closed or abandoned to expire,
over connections that come and go — leaves no trace: the server's RSS stops growing after
warm-up (slope ≈ 0), open sessions and kept bytes return to 0 after the idle timeout, and its
file descriptors are where they started.

CI runs 60 s. The long run (30 minutes, report written as JSON):

    LAYERD_SOAK_SECONDS=1800 LAYERD_SOAK_JSON=bench/results/soak.json \\
        .venv/bin/python -m pytest -s tests/python/test_soak.py
"""
import json
import os
import random
import threading
import time

import grpc
import numpy as np

from layerd_server import Server
from test_numpy_conformance import to_tensor

SECONDS = float(os.environ.get("LAYERD_SOAK_SECONDS", 60))
IDLE = 2  # seconds: abandoned sessions expire quickly, so churn reaches a steady state
WORKERS = 4
CALLS_PER_SESSION = 10
SESSIONS_PER_CONNECTION = 25
WARMUP = 0.3  # fraction of the run excluded from the slope


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(samples):
    """Least-squares slope of (seconds, value) samples, per minute."""
    t = np.array([s[0] for s in samples])
    v = np.array([s[1] for s in samples])
    return float(np.polyfit(t, v, 1)[0] * 60)


def test_session_churn_leaves_no_trace(pb):
    pb2, pb2_grpc = pb
    server = Server(f"--default-idle-timeout={IDLE}s", f"--max-idle-timeout={IDLE}s", "--metrics-addr=127.0.0.1:0")
    pid = server.proc.pid
    fds_before = fds(pid)
    stop = threading.Event()
    counts = {"sessions": 0, "closed": 0, "abandoned": 0, "calls": 0, "connections": 0, "errors": []}
    lock = threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            with server.channel() as channel:
                with lock:
                    counts["connections"] += 1
                stub = pb2_grpc.LayerServiceStub(channel)
                for _ in range(SESSIONS_PER_CONNECTION):
                    if stop.is_set():
                        break
                    try:
                        churn_one(stub, rng)
                    except grpc.RpcError as error:
                        with lock:
                            counts["errors"].append(f"{error.code()}: {error.details()}")

    def churn_one(stub, rng):
        sid = stub.CreateSession(pb2.CreateSessionRequest()).session_id
        kind = rng.choice(["relu", "sigmoid"])
        stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="l", kind=kind))
        n = rng.choice([256, 4096, 65536])
        x = to_tensor(pb2, np.linspace(-2, 2, n, dtype=np.float32))
        for _ in range(CALLS_PER_SESSION // 2):
            stub.Forward(pb2.ForwardRequest(session_id=sid, layer_id="l", x=x))
            stub.Backward(pb2.BackwardRequest(session_id=sid, layer_id="l", dout=x))
        closing = rng.random() < 0.5
        if closing:
            stub.CloseSession(pb2.CloseSessionRequest(session_id=sid))
        with lock:
            counts["sessions"] += 1
            counts["calls"] += CALLS_PER_SESSION + 2 + closing
            counts["closed" if closing else "abandoned"] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    samples = []  # (seconds, rss MiB, fds, sessions open)
    interval = max(0.5, SECONDS / 120)
    while time.monotonic() - started < SECONDS:
        time.sleep(interval)
        metrics = server.metrics()
        samples.append((time.monotonic() - started, server.rss_mib(), fds(pid),
                        metrics[("layerd_sessions_open", ())]))
    stop.set()
    for thread in threads:
        thread.join()

    # Everything abandoned expires within the idle timeout (+ the purge task's wake-up).
    deadline = time.monotonic() + IDLE + 3
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics[("layerd_sessions_open", ())] == 0:
            break
        time.sleep(0.2)
    sessions_after = metrics[("layerd_sessions_open", ())]
    kept_after = metrics[("layerd_kept_bytes", ())]
    time.sleep(0.5)  # closed client connections are gone from the server too
    fds_after = fds(pid)
    steady = [s for s in samples if s[0] >= WARMUP * SECONDS]
    rss_slope = slope_per_minute([(s[0], s[1]) for s in steady])
    fd_slope = slope_per_minute([(s[0], s[2]) for s in steady])
    report = {
        "seconds": SECONDS, "workers": WORKERS, "idle_timeout_s": IDLE,
        "sessions": counts["sessions"], "closed": counts["closed"], "abandoned": counts["abandoned"],
        "calls": counts["calls"], "connections": counts["connections"], "errors": len(counts["errors"]),
        "rss_start_mib": samples[0][1], "rss_end_mib": samples[-1][1],
        "rss_max_steady_mib": max(s[1] for s in steady), "rss_slope_mib_per_min": rss_slope,
        "fds_before": fds_before, "fds_after": fds_after,
        "fds_max": max(s[2] for s in samples), "fd_slope_per_min": fd_slope,
        "sessions_open_max": max(s[3] for s in samples), "sessions_open_after": sessions_after,
        "kept_bytes_after": kept_after, "samples": samples,
    }
    if os.environ.get("LAYERD_SOAK_JSON"):
        with open(os.environ["LAYERD_SOAK_JSON"], "w") as out:
            json.dump(report, out, indent=1)
    assert server.stop() == 0
    print("\nsoak: " + json.dumps({k: v for k, v in report.items() if k != "samples"}))

    assert not counts["errors"], counts["errors"][:5]
    assert counts["abandoned"] > 0 and counts["closed"] > 0
    assert sessions_after == 0 and kept_after == 0
    assert fds_after <= fds_before + 1, (fds_before, fds_after)
    # Flat after warm-up: under 1 MiB per minute (a leak of one 4 Ki session per second would be
    # several), and at most 16 MiB above where the steady phase began.
    assert abs(rss_slope) < 1.0 or max(s[1] for s in steady) < steady[0][1] + 16, report
    assert not any("panicked" in line for line in server.log)

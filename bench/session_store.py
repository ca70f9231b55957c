#!/usr/bin/env python3
"""The session store's cost, side by side in one run: layerd without a store, with
`--session-store` in sync mode and in async mode (a real redis-server on loopback), the same
cases against each in alternating rounds, medians and ratios to the store-off server.

    python3 bench/session_store.py --rounds 3        # release build: cargo build --release
    python3 bench/session_store.py --quick --layerd target/debug/layerd   # smoke run (CI)

Cases (clients: layerd-bench, which checks every answer; and a plain grpcio client with the
layerd package's generated stubs for churn and handovers):
- ReLU Forward+Backward on 1 Ki float32 elements, concurrency 16, on held sessions;
- session churn: create, add a layer, Forward, Backward, close (4 threads);
- TrainStep of the MLP and of the convnet of `bench/train.py` (layerd-bench --network);
- graceful handover of an MLP session with Adam (about 1 MB): calls alternating between two
  replicas, each one a handover; p50 / p99 of the call;
- take-over after SIGKILL of the holder: time from the kill to the first successful call on
  another replica;
- Redis memory per stored session (MEMORY USAGE) against its export size.
Prints Markdown tables with the CPU model.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from layerd.v1 import layerd_pb2 as pb
from layerd.v1 import layerd_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
#: TrainSteps in flight per session in the pipelined cases (numbered by expected_step).
PIPELINE = 4


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited at start ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{proc.args[0]} did not listen on {port}")


class Redis:
    def __init__(self):
        self.port, self.dir = free_port(), tempfile.mkdtemp(prefix="layerd-bench-redis-")
        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        self.url = f"redis://127.0.0.1:{self.port}"

    def cli(self, *args) -> str:
        return subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(self.port), *args],
                              check=True, capture_output=True, text=True).stdout.strip()


class Layerd:
    def __init__(self, binary: str, *flags: str):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([binary, "--addr", self.addr, *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def bench_rate(bench: str, addr: str, case: list, duration: str) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([bench, "--addr", addr, *case, "--duration", duration, "--warmup", "1s", "--json", out.name],
                       check=True, stdout=subprocess.DEVNULL)
        report = json.loads(Path(out.name).read_text())
    runs = report["runs"] if isinstance(report, dict) else report
    assert not runs[0].get("errors") and not runs[0].get("mismatches"), runs[0]
    return runs[0]["calls_per_s"]


def tensor(a: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=a.shape, data=a.astype("<f4").tobytes())


def churn_rate(addr: str, seconds: float, threads: int = 4) -> float:
    """Sessions per second through create, add a ReLU, Forward, Backward, close."""
    x = tensor(np.linspace(-1, 1, 1024, dtype=np.float32))
    done, stop = [0] * threads, time.monotonic() + seconds

    def worker(i):
        with grpc.insecure_channel(addr) as channel:
            stub = layerd_pb2_grpc.LayerServiceStub(channel)
            while time.monotonic() < stop:
                sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
                meta = (("x-session-id", sid),)
                stub.CreateLayer(pb.CreateLayerRequest(session_id=sid, layer_id="r", kind="relu"), metadata=meta)
                stub.Forward(pb.ForwardRequest(session_id=sid, layer_id="r", x=x), metadata=meta)
                stub.Backward(pb.BackwardRequest(session_id=sid, layer_id="r", dout=x), metadata=meta)
                stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=meta)
                done[i] += 1

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / (time.monotonic() - started)


def mlp_session(stub, sid: str, forward: bool = False) -> None:
    """An MLP 784-100-10 with Adam and one TrainStep: about 1 MB of parameters and state; with
    `forward`, then a keeping Forward on its batch (about 360 KB kept, moved at each handover)."""
    meta = (("x-session-id", sid),)
    stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=meta)
    member = lambda name, kind, **c: pb.LayerSpec(name=name, kind=kind, config=pb.LayerConfig(**c))  # noqa: E731
    config = pb.LayerConfig(sequential=pb.SequentialConfig(layers=[
        member("fc1", "affine", affine=pb.AffineConfig(in_features=784, out_features=100)),
        member("relu", "relu"),
        member("fc2", "affine", affine=pb.AffineConfig(in_features=100, out_features=10)),
        member("loss", "softmax_with_loss")]))
    stub.CreateLayer(pb.CreateLayerRequest(session_id=sid, layer_id="net", kind="sequential", config=config),
                     metadata=meta)
    stub.CreateOptimizer(pb.CreateOptimizerRequest(session_id=sid, optimizer_id="adam", adam=pb.Adam()),
                         metadata=meta)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((100, 784), np.float32), rng.integers(0, 10, 100)
    stub.TrainStep(pb.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="adam", x=tensor(x),
                                       t=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[100], data=t.astype("<i8").tobytes())),
                   metadata=meta)
    if forward:
        stub.Forward(pb.ForwardRequest(session_id=sid, layer_id="net", x=tensor(x),
                                       t=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[100], data=t.astype("<i8").tobytes())),
                     metadata=meta)


def handovers(a: Layerd, b: Layerd, count: int) -> list:
    """Latencies (s) of DescribeSession calls alternating between a and b, each a handover (of
    the session's state and of what its last Forward kept)."""
    channels = [grpc.insecure_channel(r.addr) for r in (a, b)]
    stubs = [layerd_pb2_grpc.LayerServiceStub(c) for c in channels]
    sid = f"handover-{os.getpid()}"
    mlp_session(stubs[0], sid, forward=True)
    latencies = []
    for k in range(count):
        started = time.perf_counter()
        answer = stubs[(k + 1) % 2].DescribeSession(pb.DescribeSessionRequest(session_id=sid),
                                                    metadata=(("x-session-id", sid),))
        latencies.append(time.perf_counter() - started)
        assert answer.optimizers[0].steps == 1
    # The Forward's kept state moved with every handover: Backward runs where the session is now.
    stubs[count % 2].Backward(pb.BackwardRequest(session_id=sid, layer_id="net"), metadata=(("x-session-id", sid),))
    stubs[count % 2].CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=(("x-session-id", sid),))
    for c in channels:
        c.close()
    return latencies


KILLS = iter(range(1_000_000))


def takeover_after_kill(binary: str, redis: Redis) -> float:
    """Seconds from SIGKILL of the holder to the first successful call on another replica."""
    a = Layerd(binary, "--session-store", redis.url, "--replica-id", "kill-a")
    b = Layerd(binary, "--session-store", redis.url, "--replica-id", "kill-b")
    try:
        with grpc.insecure_channel(a.addr) as ca, grpc.insecure_channel(b.addr) as cb:
            sid = f"kill-{os.getpid()}-{next(KILLS)}"
            mlp_session(layerd_pb2_grpc.LayerServiceStub(ca), sid)
            stub = layerd_pb2_grpc.LayerServiceStub(cb)
            a.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            while True:
                try:
                    stub.DescribeSession(pb.DescribeSessionRequest(session_id=sid), timeout=5)
                    return time.monotonic() - killed
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    time.sleep(0.01)
    finally:
        a.stop()
        b.stop()


def memory_ratio(binary: str, redis: Redis) -> tuple:
    """(Redis bytes of one stored MLP session, its export size)."""
    r = Layerd(binary, "--session-store", redis.url, "--replica-id", "memory")
    try:
        with grpc.insecure_channel(r.addr, options=[("grpc.max_receive_message_length", 64 << 20)]) as c:
            stub = layerd_pb2_grpc.LayerServiceStub(c)
            sid = f"memory-{os.getpid()}"
            mlp_session(stub, sid)
            exported = len(stub.ExportSession(pb.ExportSessionRequest(session_id=sid),
                                              metadata=(("x-session-id", sid),)).safetensors)
            keys = [k for k in redis.cli("--scan", "--pattern", "layerd:*").splitlines() if k.endswith(f":{sid}}}")]
            assert len(keys) == 3, keys  # the session's hash, state and answers
            return sum(int(redis.cli("MEMORY", "USAGE", k, "SAMPLES", "0")) for k in keys), exported
    finally:
        r.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layerd", default=str(REPO / "target" / "release" / "layerd"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="4s")
    parser.add_argument("--handovers", type=int, default=200)
    parser.add_argument("--only", nargs="*", help="run only the cases whose names start with these words "
                                                  "(and skip handovers, kills and memory)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (one round of 1 s, 5 handovers, no convnet: a debug build takes "
                             "seconds a step); the figures mean nothing")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.handovers = 1, "1s", 5
    bench = str(Path(args.layerd).with_name("layerd-bench"))
    seconds = float(args.duration.rstrip("s"))
    redis = Redis()
    sides = {
        "off": Layerd(args.layerd),
        "sync": Layerd(args.layerd, "--session-store", redis.url, "--replica-id", "sync"),
        "async": Layerd(args.layerd, "--session-store", redis.url, "--replica-id", "async",
                        "--durability", "async"),
    }
    cases = {
        "ReLU 1 Ki train, c16 (calls/s)": lambda addr: bench_rate(
            bench, addr, ["--mode", "train", "--kind", "relu", "--elements", "1024", "--concurrency", "16"],
            args.duration),
        "session churn, 4 threads (sessions/s)": lambda addr: churn_rate(addr, seconds),
        "MLP TrainStep (steps/s)": lambda addr: bench_rate(bench, addr, ["--mode", "train-step", "--network", "mlp"],
                                                            args.duration),
        "convnet TrainStep (steps/s)": lambda addr: bench_rate(
            bench, addr, ["--mode", "train-step", "--network", "convnet"], args.duration),
        **{f"{net} TrainStep, pipelined {PIPELINE} (steps/s)": (lambda net: lambda addr: bench_rate(
            bench, addr, ["--mode", "train-step", "--network", net.lower(), "--pipeline", str(PIPELINE)],
            args.duration))(net) for net in ("MLP", "convnet")},
    }
    try:
        print(f"CPU: {cpu_model()}; Redis on loopback; medians of {args.rounds} alternating rounds of "
              f"{args.duration}\n")
        print("| case | store off | sync | async | sync / off | async / off |\n|---|---:|---:|---:|---:|---:|")
        for name, run in cases.items():
            if args.only and not any(name.startswith(word) for word in args.only):
                continue
            if args.quick and name.startswith("convnet"):
                continue
            got = {side: [] for side in sides}
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for side in order:
                    got[side].append(run(sides[side].addr))
            med = {side: statistics.median(v) for side, v in got.items()}
            print(f"| {name} | {med['off']:.1f} | {med['sync']:.1f} | {med['async']:.1f} | "
                  f"{med['sync'] / med['off']:.2f} | {med['async'] / med['off']:.2f} |", flush=True)
        if args.only:
            return
        latencies = sorted(handovers(sides["sync"], sides["async"], args.handovers))
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]
        print(f"\nGraceful handover of an MLP session with Adam, {args.handovers} calls alternating between two "
              f"replicas: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
        kills = [takeover_after_kill(args.layerd, redis) for _ in range(args.rounds)]
        print(f"First successful call on another replica after SIGKILL of the holder: median "
              f"{statistics.median(kills):.2f} s, worst {max(kills):.2f} s ({args.rounds} kills)")
        used, exported = memory_ratio(args.layerd, redis)
        print(f"Redis memory of one stored MLP session: {used} bytes; its export: {exported} bytes "
              f"({used / exported:.3f}x)")
    finally:
        for side in sides.values():
            side.stop()
        redis.proc.terminate()


if __name__ == "__main__":
    main()

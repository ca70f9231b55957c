"""The memory formula of docs/kubernetes.md, measured: a server whose kept budget is full and
which is offered twice its concurrent calls at its message size, one connection each, stays within

    baseline + kept budget + concurrent calls x PER_CALL x message size
             + connections x stream window (what a client uploads of a call that is then shed).

test_k8s_manifests.py checks the Deployment's limit against the same formula."""
import threading
import time

import grpc
import numpy as np

from layerd_server import Server, RssPeak

#: The process itself: threads, allocator arenas, HTTP/2 buffers (7-15 MiB idle measured,
#: 19-28 MiB over the 30-minute soak).
BASELINE_MIB = 40
#: What one call in flight holds, in message sizes: its request, its answer and the answer's
#: encoded copy (measured: 1.6x release, 2.1x debug build).
PER_CALL = 3


def budget_mib(kept_mib, calls, message_mib, connections, stream_window_mib=4, work_mib=0):
    """The formula; `work_mib` (--max-work-bytes) is what a computation may build besides its
    tensors (a convolution's im2col), about PER_CALL arrays of it per call at most."""
    return (BASELINE_MIB + kept_mib + calls * PER_CALL * (message_mib + work_mib)
            + connections * stream_window_mib)


def test_peak_memory_stays_within_the_formula(pb):
    pb2, pb2_grpc = pb
    calls, message_mib, kept_mib = 8, 8, 128
    connections = 2 * calls + 1  # the callers' and the filler's
    server = Server("--max-concurrent-calls", str(calls), "--max-message-bytes", f"{message_mib}MiB",
                    "--max-total-kept-bytes", f"{kept_mib}MiB", "--max-session-kept-bytes", f"{kept_mib}MiB",
                    "--max-connections", str(connections))

    def tensor(a):
        return pb2.Tensor(dtype=pb2.DTYPE_FLOAT32, shape=a.shape, data=a.tobytes())

    try:
        filler = pb2_grpc.LayerServiceStub(server.channel())
        # Fill the kept budget: sigmoid keeps y, 4 MiB at a time, until the server refuses.
        chunk, kept = tensor(np.linspace(-3, 3, 1 << 20, dtype=np.float32)), 0
        while True:
            filler.CreateSession(pb2.CreateSessionRequest(session_id=f"fill-{kept}"))
            filler.CreateLayer(pb2.CreateLayerRequest(session_id=f"fill-{kept}", layer_id="l", kind="sigmoid"))
            try:
                filler.Forward(pb2.ForwardRequest(session_id=f"fill-{kept}", layer_id="l", x=chunk))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-total-kept-bytes" in e.details()
                break
            kept += 1
        assert kept >= kept_mib // 4 - 1

        # Twice the concurrent calls, each on its own connection, each a message-size tensor;
        # no_grad, since the kept budget is full.
        x = tensor(np.linspace(-3, 3, ((message_mib << 20) - 4096) // 4, dtype=np.float32))
        peak, stop, outcomes = RssPeak(server), time.monotonic() + 4, {"ok": 0, "shed": 0}

        failures = []

        def caller(index, kind):
            stub, sid = pb2_grpc.LayerServiceStub(server.channel()), f"call-{index}"
            # Each setup step and each Forward may be shed; a shed step is tried again.
            steps = [lambda: stub.CreateSession(pb2.CreateSessionRequest(session_id=sid)),
                     lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="l", kind=kind))]
            forward = pb2.ForwardRequest(session_id=sid, layer_id="l", x=x, no_grad=True)
            while time.monotonic() < stop:
                try:
                    if steps:
                        steps[0]()
                        steps.pop(0)
                        continue
                    stub.Forward(forward)
                    outcomes["ok"] += 1
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or "overloaded" not in e.details():
                        failures.append(e)
                        return
                    outcomes["shed"] += 1

        threads = [threading.Thread(target=caller, args=(i, kind))
                   for i, kind in enumerate(["relu", "sigmoid"] * calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak_mib = peak.stop()
        assert not failures, failures
        assert outcomes["ok"] > 0 and outcomes["shed"] > 0, outcomes  # it was really overloaded
        bound = budget_mib(kept_mib, calls, message_mib, connections)
        assert peak_mib <= bound, f"peak RSS {peak_mib:.0f} MiB over the formula's {bound} MiB ({outcomes})"
        print(f"peak RSS {peak_mib:.0f} MiB, formula {bound} MiB, {outcomes}")
    finally:
        assert server.stop() == 0

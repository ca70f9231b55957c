"""The memory formula of docs/kubernetes.md, measured: a server whose kept budget is full and
which is offered twice its concurrent calls at its message size, one connection each, stays within

    baseline + kept budget + concurrent calls x PER_CALL x message size
             + connections x stream window (what a client uploads of a call that is then shed).

test_k8s_manifests.py checks the Deployment's limit against the same formula."""
import threading
import time

import numpy as np

from layerd_server import Server, RssPeak

#: The process itself: threads, allocator arenas, HTTP/2 buffers (7-15 MiB idle measured,
#: 19-28 MiB over the 30-minute soak).
BASELINE_MIB = 40
#: What one call in flight holds, in message sizes: its request, its answer and the answer's
#: encoded copy (measured: 1.6x release, 2.1x debug build).
PER_CALL = 3


def budget_mib(kept_mib, calls, message_mib, connections, stream_window_mib=4):
    return BASELINE_MIB + kept_mib + calls * PER_CALL * message_mib + connections * stream_window_mib


def test_peak_memory_stays_within_the_formula():
    import layerd
    calls, message_mib, kept_mib = 8, 8, 128
    connections = 2 * calls + 1  # the callers' and the filler's
    server = Server("--max-concurrent-calls", str(calls), "--max-message-bytes", f"{message_mib}MiB",
                    "--max-total-kept-bytes", f"{kept_mib}MiB", "--max-session-kept-bytes", f"{kept_mib}MiB",
                    "--max-connections", str(connections))
    try:
        limit = (message_mib + 1) << 20
        no_retry = layerd.Retry(attempts=1)
        client = layerd.Client(server.addr, max_message_bytes=limit, retry=no_retry)
        # Fill the kept budget: sigmoid keeps y, 4 MiB at a time, until the server refuses.
        kept, chunk = [], np.linspace(-3, 3, 1 << 20, dtype=np.float32)
        while True:
            s = client.session()
            try:
                s.layer("sigmoid").forward(chunk)
            except layerd.ResourceExhausted as e:
                assert e.metadata["limit"] == "--max-total-kept-bytes"
                break
            kept.append(s)
        assert len(kept) >= kept_mib // 4 - 1

        # Twice the concurrent calls, each on its own connection, each a message-size tensor.
        x = np.linspace(-3, 3, ((message_mib << 20) - 4096) // 4, dtype=np.float32)
        peak, stop, outcomes = RssPeak(server), time.monotonic() + 4, {"ok": 0, "OVERLOADED": 0}

        def caller(kind):
            c = layerd.Client(server.addr, max_message_bytes=limit, retry=no_retry)
            while time.monotonic() < stop:
                try:
                    with c.session() as s:
                        layer = s.layer(kind)
                        while time.monotonic() < stop:
                            layer.forward(x, no_grad=True)  # the kept budget is full
                            outcomes["ok"] += 1
                except layerd.LayerdError as e:
                    assert e.reason == "OVERLOADED", e
                    outcomes["OVERLOADED"] += 1

        threads = [threading.Thread(target=caller, args=(kind,)) for kind in ["relu", "sigmoid"] * calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak_mib = peak.stop()
        assert outcomes["ok"] > 0 and outcomes["OVERLOADED"] > 0, outcomes  # it was really overloaded
        bound = budget_mib(kept_mib, calls, message_mib, connections)
        assert peak_mib <= bound, f"peak RSS {peak_mib:.0f} MiB over the formula's {bound} MiB ({outcomes})"
        print(f"peak RSS {peak_mib:.0f} MiB, formula {bound} MiB, {outcomes}")
        for s in kept:
            s.close()
        client.close()
    finally:
        assert server.stop() == 0

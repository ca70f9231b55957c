"""HTTP/2 abuse against a live server, frames crafted with the h2 project's hyperframe and hpack
on loopback, while a probe client (grpcio) measures Forward latency: Rapid Reset, CONTINUATION
flood, stream exhaustion beyond --max-concurrent-streams, invalid frames forcing resets and
connection errors, slow clients. Each: the server stays up, the probe's p99 stays within 5x its
baseline, the server's RSS stays bounded, and the server closes the connection where the
protocol says so.

Each attack runs for LAYERD_H2_ABUSE_SECONDS (default 3) seconds at most."""
import multiprocessing
import os
import struct
import threading
import time

import numpy as np
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, RstStreamFrame, WindowUpdateFrame

import h2raw
from layerd_server import RssPeak, Server
from test_numpy_conformance import to_tensor

SECONDS = float(os.environ.get("LAYERD_H2_ABUSE_SECONDS", 3))
MAX_STREAMS = 64
REQUEST_TIMEOUT = 2.0
PREFACE_TIMEOUT = 1.0
FORWARD = "/layerd.v1.LayerService/Forward"
RSS_BOUND_MIB = 256
figures = {}


class Probe:
    """Forward calls on a session, one at a time every 2 ms, timed."""

    def __init__(self, server, pb):
        pb2, pb2_grpc = pb
        self.server = server
        self.channel = server.channel()
        self.stub = pb2_grpc.LayerServiceStub(self.channel)
        self.stub.CreateSession(pb2.CreateSessionRequest(session_id="probe"))
        self.stub.CreateLayer(pb2.CreateLayerRequest(session_id="probe", layer_id="l", kind="relu"))
        self.request = pb2.ForwardRequest(session_id="probe", layer_id="l",
                                          x=to_tensor(pb2, np.linspace(-1, 1, 1024, dtype=np.float32)))
        self.samples = []  # (time, seconds, ok)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.is_set():
            started = time.monotonic()
            try:
                self.stub.Forward(self.request, timeout=10)
                ok = True
            except Exception:  # noqa: BLE001 - any failure counts
                ok = False
            self.samples.append((started, time.monotonic() - started, ok))
            time.sleep(0.002)

    def window(self, start, end):
        taken = [s for s in self.samples if start <= s[0] < end]
        latencies = np.array([s[1] for s in taken])
        return {"calls": len(taken), "failed": sum(not s[2] for s in taken),
                "p99_ms": float(np.percentile(latencies, 99) * 1000) if len(taken) else float("nan")}

    def stop(self):
        self.stopped.set()
        self.thread.join()
        self.channel.close()


@pytest.fixture(scope="module")
def target(pb):
    server = Server(f"--max-concurrent-streams={MAX_STREAMS}", f"--request-timeout={REQUEST_TIMEOUT}s",
                    f"--preface-timeout={PREFACE_TIMEOUT}s")
    probe = Probe(server, pb)
    time.sleep(0.5)  # warm
    start = time.monotonic()
    time.sleep(SECONDS)
    baseline = probe.window(start, time.monotonic())
    baseline["rss_mib"] = server.rss_mib()
    figures["baseline"] = baseline
    yield server, probe, baseline
    probe.stop()
    code = server.stop()
    print("\nHTTP/2 abuse figures:")
    for name, figure in figures.items():
        print(f"  {name}: {figure}")
    assert code == 0
    assert not any("panicked" in line for line in server.log)


def under_attack(target, name, attack):
    """Runs `attack(deadline)` while the probe runs; checks the server stayed up, the probe's
    p99 and the RSS; returns what the attack returned."""
    server, probe, baseline = target
    sampler = RssPeak(server)
    start = time.monotonic()
    # The attacker runs in its own process: sharing the probe's interpreter (and its GIL) would
    # slow the probe down whatever the server did.
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def run():
        try:
            results.put(("ok", attack(start + SECONDS)))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            results.put(("failed", f"{type(error).__name__}: {error}"))

    attacker = context.Process(target=run)
    attacker.start()
    try:
        outcome, result = results.get(timeout=SECONDS + 60)
        attacker.join()
    finally:
        peak = sampler.stop()
    assert outcome == "ok", f"{name}: the attacker failed: {result}"
    end = time.monotonic()
    during = probe.window(start, end)
    figures[name] = {**during, "baseline_p99_ms": round(baseline["p99_ms"], 3),
                     "rss_peak_mib": round(peak, 1), **(result or {})}
    assert server.proc.poll() is None, f"{name}: the server died"
    assert during["calls"] > 10 and during["failed"] == 0, figures[name]
    assert during["p99_ms"] <= 5 * baseline["p99_ms"], figures[name]
    assert peak < baseline["rss_mib"] + RSS_BOUND_MIB, figures[name]
    return result


def test_rapid_reset(target):
    """HEADERS then RST_STREAM(CANCEL), as fast as the client can: CVE-2023-44487."""
    server = target[0]

    def attack(deadline):
        connections, streams, closed_by_server, goaways = 0, 0, 0, set()
        while time.monotonic() < deadline:
            conn = h2raw.RawConnection(server.addr)
            connections += 1
            stream_id = 1
            while time.monotonic() < deadline and not conn.closed.is_set() and stream_id < 2**31 - 200:
                batch = []
                for _ in range(100):
                    batch += [conn.request_headers(stream_id, FORWARD),
                              RstStreamFrame(stream_id, error_code=h2raw.CANCEL)]
                    stream_id += 2
                if not conn.send(*batch):
                    break
                streams += 100
            closed_by_server += conn.closed.wait(0.2)
            if conn.goaway:
                goaways.add(conn.goaway.error_code)
            conn.close()
        return {"connections": connections, "closed_by_server": closed_by_server, "streams_reset": streams,
                "goaway_codes": sorted(goaways)}

    result = under_attack(target, "rapid_reset", attack)
    # The server ends reset floods (h2's pending-accept reset limit) with ENHANCE_YOUR_CALM.
    assert result["closed_by_server"] >= result["connections"] - 1, result
    assert result["goaway_codes"] == [h2raw.ENHANCE_YOUR_CALM], result


def test_continuation_flood(target):
    """HEADERS without END_HEADERS, then CONTINUATION frames that never end."""
    server = target[0]

    def attack(deadline):
        closed_after, goaways = [], []
        while time.monotonic() < deadline:
            conn = h2raw.RawConnection(server.addr)
            start_bytes = conn.sent_bytes
            first = conn.request_headers(1, FORWARD, end_headers=False)
            conn.send(first)
            # Each fragment is a literal header field (never indexed): valid HPACK, endless.
            fragment = b"\x10\x05x-pad" + bytes([0x7F, 0x81, 0x7F]) + b"a" * (16256)
            frames = 0
            while not conn.closed.is_set():
                if time.monotonic() > deadline:
                    break
                if not conn.send(ContinuationFrame(1, data=fragment)):
                    break
                frames += 1
                if frames < 100:
                    time.sleep(0.002)  # paced, so what the server read is what was sent
                if conn.sent_bytes - start_bytes > 64 << 20:
                    break
            if not conn.closed.wait(5) and time.monotonic() > deadline and frames < 10:
                conn.close()  # cut short by the deadline, not a flood yet
                continue
            assert conn.closed.is_set(), f"the server keeps a CONTINUATION flood open ({frames} frames)"
            closed_after.append((conn.sent_at_goaway or conn.sent_bytes) - start_bytes)
            goaways.append(conn.goaway.error_code if conn.goaway else None)
            conn.close()
        return {"connections": len(closed_after), "max_bytes_before_close": max(closed_after),
                "goaway_codes": sorted({g for g in goaways if g is not None})}

    result = under_attack(target, "continuation_flood", attack)
    # Closed after at most the 16 KiB header list limit and a few frames, not 64 MiB.
    assert result["max_bytes_before_close"] < 1 << 20, result


def test_stream_exhaustion_and_stalled_uploads(target):
    """Opens the advertised maximum of streams, each a call whose upload stalls, and then more:
    the excess is refused, and the stalled calls end with DEADLINE_EXCEEDED at the request
    timeout instead of holding their slots forever."""
    server = target[0]

    def attack(deadline):
        conn = h2raw.RawConnection(server.addr)
        time.sleep(0.1)  # the server's SETTINGS arrive
        held = [1 + 2 * i for i in range(MAX_STREAMS)]
        extra = [1 + 2 * i for i in range(MAX_STREAMS, MAX_STREAMS + 32)]
        # A 5-byte gRPC prefix announcing 100 bytes, then nothing more.
        stalled = b"\x00" + struct.pack(">I", 100)
        for stream_id in held:
            conn.send(conn.request_headers(stream_id, FORWARD), DataFrame(stream_id, data=stalled))
        time.sleep(0.2)
        for stream_id in extra:
            conn.send(conn.request_headers(stream_id, FORWARD), DataFrame(stream_id, data=stalled))
        time.sleep(0.3)
        refused = {}  # the first reset of each extra stream (a later DATA frame may draw STREAM_CLOSED)
        for frame in conn.frames_of(RstStreamFrame):
            if frame.stream_id in extra:
                refused.setdefault(frame.stream_id, frame.error_code)
        wait_until = max(deadline, time.monotonic() + REQUEST_TIMEOUT + 1)
        while time.monotonic() < wait_until:
            answered = {f.stream_id for f in conn.frames_of(HeadersFrame) if f.stream_id in held
                        and f.headers.get("grpc-status") == "4"}
            if len(answered) == len(held):
                break
            time.sleep(0.1)
        statuses = {f.headers.get("grpc-status") for f in conn.frames_of(HeadersFrame) if f.stream_id in held}
        conn.close()
        return {"held": len(held), "refused": len(refused),
                "refused_codes": sorted(set(refused.values())), "timed_out": len(answered),
                "held_statuses": sorted(s for s in statuses if s)}

    result = under_attack(target, "stream_exhaustion", attack)
    assert result["refused"] == 32, result
    assert set(result["refused_codes"]) <= {h2raw.REFUSED_STREAM, h2raw.PROTOCOL_ERROR}, result
    assert result["timed_out"] == MAX_STREAMS and result["held_statuses"] == ["4"], result


def test_invalid_frames(target):
    """Stream errors (a request whose DATA falls short of its content-length: malformed, reset
    with PROTOCOL_ERROR) repeated until the server gives up on the connection
    (--max-local-error-reset-streams); then connection errors, each answered with a close
    (with GOAWAY where the server gets to send one)."""
    server = target[0]

    def attack(deadline):
        conn = h2raw.RawConnection(server.addr)
        stream_id, resets = 1, 0
        while not conn.closed.is_set() and time.monotonic() < deadline and stream_id < 20001:
            batch = []
            for _ in range(50):
                batch += [conn.request_headers(stream_id, FORWARD, extra=[("content-length", "10")]),
                          DataFrame(stream_id, data=b"x", flags=["END_STREAM"])]
                stream_id += 2
            if not conn.send(*batch):
                break
            # Paced by the answers, so the server never closes with our frames unread (which
            # would turn its close into a TCP reset that loses its GOAWAY).
            wait_until = time.monotonic() + 1
            while (len(conn.frames_of(RstStreamFrame)) < (stream_id - 1) // 2 and not conn.closed.is_set()
                   and time.monotonic() < wait_until):
                time.sleep(0.002)
        conn.closed.wait(3)
        resets = len(conn.frames_of(RstStreamFrame))
        stream_errors = {"streams": (stream_id - 1) // 2, "resets": resets,
                         "goaway": conn.goaway.error_code if conn.goaway else None,
                         "closed": conn.closed.is_set()}
        conn.close()

        connection_errors = {}
        cases = {
            "DATA on stream 0": lambda c: c.send_raw(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd"),
            "HEADERS on an even stream": lambda c: c.send(c.request_headers(2, FORWARD)),
            "frame over the size limit": lambda c: c.send_raw(
                struct.pack(">I", 0x00FFFFFF)[1:] + b"\x00\x00\x00\x00\x00\x01" + b"\x00" * (1 << 20)),
            "DATA after END_STREAM": lambda c: c.send(
                c.request_headers(1, FORWARD, end_stream=True), DataFrame(1, data=b"x")),
            "upper-case header name": lambda c: c.send(c.request_headers(1, FORWARD, extra=[("X-Bad", "1")])),
            "WINDOW_UPDATE of 0": lambda c: c.send(
                c.request_headers(1, FORWARD), WindowUpdateFrame(1, window_increment=0)),
            "PING of 7 bytes": lambda c: c.send_raw(b"\x00\x00\x07\x06\x00\x00\x00\x00\x00" + b"\x00" * 7),
            "SETTINGS ENABLE_PUSH=2": lambda c: c.send_raw(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x02"),
            "connection WINDOW_UPDATE overflow": lambda c: c.send(
                WindowUpdateFrame(0, window_increment=2**31 - 1), WindowUpdateFrame(0, window_increment=2**31 - 1)),
        }
        for case, send in cases.items():
            c = h2raw.RawConnection(server.addr)
            time.sleep(0.05)
            send(c)
            closed = c.closed.wait(3)
            connection_errors[case] = (c.goaway.error_code if c.goaway else None, closed)
            c.close()
        return {"stream_errors": stream_errors, "connection_errors": connection_errors}

    result = under_attack(target, "invalid_frames", attack)
    stream = result["stream_errors"]
    assert 900 <= stream["resets"] <= 1100 and stream["closed"], result  # the limit is 1024
    assert stream["goaway"] == h2raw.ENHANCE_YOUR_CALM, result
    for case, (code, closed) in result["connection_errors"].items():
        assert closed, case
        assert code in (None, h2raw.PROTOCOL_ERROR, h2raw.FRAME_SIZE_ERROR, h2raw.FLOW_CONTROL_ERROR), (case, code)


def test_slow_clients(target):
    """Connections that never send their preface, or drip it a byte at a time, and readers that
    ask for a 2 MiB answer and never open their 64 KiB receive window, all while the probe runs:
    the server closes the first two kinds at --preface-timeout, flow control holds the answers
    back, and memory stays bounded."""
    from tritonclient.grpc import service_pb2 as kpb

    server = target[0]
    request = kpb.ModelInferRequest(model_name="relu")
    request.inputs.add(name="x", datatype="FP32", shape=[1 << 19])
    request.raw_input_contents.append(np.ones(1 << 19, np.float32).tobytes())
    message = request.SerializeToString()
    body = b"\x00" + struct.pack(">I", len(message)) + message

    def attack(deadline):
        idle = [h2raw.RawConnection(server.addr, preface=False) for _ in range(200)]
        dripping = idle[100:]
        readers = [h2raw.RawConnection(server.addr) for _ in range(8)]
        for conn in readers:
            conn.send(conn.request_headers(1, "/inference.GRPCInferenceService/ModelInfer"))
            chunks = range(0, len(body), 16384)
            conn.send(*[DataFrame(1, data=body[i:i + 16384], flags=["END_STREAM"] if i + 16384 >= len(body) else [])
                        for i in chunks])
        sent = 0
        while time.monotonic() < deadline and sent < len(h2raw.PREFACE) - 1:
            for conn in dripping:
                conn.send_raw(h2raw.PREFACE[sent:sent + 1])
            sent += 1
            time.sleep(0.25)
        time.sleep(max(0.0, deadline - time.monotonic()))
        lifetimes = [c.closed_at - c.opened_at for c in idle if c.closed.is_set()]
        received = [sum(len(f.data) for f in conn.frames_of(DataFrame, 1)) for conn in readers]
        still_open = sum(not c.closed.is_set() for c in idle)
        for conn in idle + readers:
            conn.close()
        return {"idle_connections": len(idle), "idle_still_open": still_open,
                "idle_closed_after_s": [round(min(lifetimes), 2), round(max(lifetimes), 2)] if lifetimes else None,
                "readers": len(readers),
                "answer_bytes": len(body), "max_bytes_received": max(received), "min_bytes_received": min(received)}

    result = under_attack(target, "slow_clients", attack)
    assert result["idle_still_open"] == 0, result
    low, high = result["idle_closed_after_s"]
    assert PREFACE_TIMEOUT - 0.1 <= low and high < PREFACE_TIMEOUT + 1.0, result
    # Answers started, and flow control held them at the reader's 64 KiB window.
    assert 0 < result["min_bytes_received"] and result["max_bytes_received"] <= 65535, result


def test_figures_reported():
    assert "baseline" in figures

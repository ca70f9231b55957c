"""--state-dir: sessions that hold parameters survive restarts.

- SIGTERM in the middle of a training loop, restart on the same directory: the client's next
  TrainStep (same session id) continues bit for bit as if nothing had happened.
- SIGKILL with --snapshot-interval 1s: the session comes back at a snapshot no older than the
  interval (plus the time one snapshot takes).
- Corrupt or foreign files in the directory are logged and skipped, never fatal.
"""
import json
import signal
import time

import grpc
import numpy as np
import pytest

from layerd_server import Server
from test_checkpoints import batches, build, export
from test_training_layers import bits_equal, to_tensor
from test_training_step import params_of


def train_step(pb2, stub, sid, x, t):
    return stub.TrainStep(pb2.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="adam",
                                               x=to_tensor(pb2, x), t=to_tensor(pb2, t)))


def test_sigterm_mid_training_then_restart_continues_bit_identically(pb, tmp_path):
    pb2, pb2_grpc = pb
    data = batches(np.float64, 10)
    reference = Server()
    with reference.channel() as channel:
        stub = pb2_grpc.LayerServiceStub(channel)
        straight = build(pb2, stub)
        want = [train_step(pb2, stub, straight, x, t).loss for x, t, _, _ in data]
        want_params, want_buffers, _ = params_of(pb2, stub, straight, "net")
    reference.stop()

    first = Server("--state-dir", str(tmp_path))
    with first.channel() as channel:
        stub = pb2_grpc.LayerServiceStub(channel)
        sid = build(pb2, stub)
        got = [train_step(pb2, stub, sid, x, t).loss for x, t, _, _ in data[:4]]
        stub.CreateSession(pb2.CreateSessionRequest(session_id="no-params"))  # nothing to keep
    assert first.stop() == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"session--{sid}.safetensors"], files
    assert any("sessions saved" in line for line in first.log)

    second = Server("--state-dir", str(tmp_path))
    try:
        assert any(json.loads(line).get("message") == "session restored" for line in second.log)
        with second.channel() as channel:
            stub = pb2_grpc.LayerServiceStub(channel)
            got += [train_step(pb2, stub, sid, x, t).loss for x, t, _, _ in data[4:]]
            assert got == want, (got, want)
            params, buffers, _ = params_of(pb2, stub, sid, "net")
            for name in want_params:
                bits_equal(params[name], want_params[name], name)
            for name in want_buffers:
                bits_equal(buffers[name], want_buffers[name], name)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ExportSession(pb2.ExportSessionRequest(session_id="no-params"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            stub.CloseSession(pb2.CloseSessionRequest(session_id=sid))
    finally:
        assert second.stop() == 0
    # A closed session's file goes at the next save.
    assert list(tmp_path.iterdir()) == []


def test_sigkill_loses_at_most_the_snapshot_interval(pb, tmp_path):
    pb2, pb2_grpc = pb
    interval = 1.0
    server = Server("--state-dir", str(tmp_path), f"--snapshot-interval={interval}s")
    x, t, _, _ = batches(np.float32, 1)[0]
    done = []  # (time the answer came, steps)
    with server.channel() as channel:
        stub = pb2_grpc.LayerServiceStub(channel)
        sid = build(pb2, stub, pb2.DTYPE_FLOAT32)
        ends = time.monotonic() + 3.5
        while time.monotonic() < ends:
            answer = train_step(pb2, stub, sid, x, t)
            done.append((time.monotonic(), answer.steps))
        killed = time.monotonic()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
    again = Server("--state-dir", str(tmp_path))
    try:
        with again.channel() as channel:
            stub = pb2_grpc.LayerServiceStub(channel)
            saved = train_step(pb2, stub, sid, x, t).steps - 1
            assert saved >= 1, "a snapshot was written"
            # The last step the snapshot holds was answered at most one interval (and the time a
            # snapshot takes, a few ms here) before the kill.
            answered = max(when for when, steps in done if steps == saved)
            assert killed - answered < interval + 0.5, (killed - answered, saved, done[-1])
            print(f"\nSIGKILL after {done[-1][1]} steps: restarted at step {saved}, "
                  f"{killed - answered:.2f} s of training lost (interval {interval} s)")
    finally:
        assert again.stop() == 0


def test_corrupt_and_foreign_files_are_skipped(pb, tmp_path):
    pb2, pb2_grpc = pb
    first = Server("--state-dir", str(tmp_path))
    with first.channel() as channel:
        stub = pb2_grpc.LayerServiceStub(channel)
        sid = build(pb2, stub)
        file = export(pb2, stub, sid)
    assert first.stop() == 0
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / "session--junk.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "session--plain.safetensors").write_bytes(file)  # an export: no session entry
    saved = tmp_path / f"session--{sid}.safetensors"
    (tmp_path / "session--truncated.safetensors").write_bytes(saved.read_bytes()[:-10])
    second = Server("--state-dir", str(tmp_path))
    try:
        skipped = [json.loads(line) for line in second.log if "skipped" in line]
        assert len(skipped) == 4, skipped
        with second.channel() as channel:
            stub = pb2_grpc.LayerServiceStub(channel)
            assert export(pb2, stub, sid) == file  # the good one is back
    finally:
        assert second.stop() == 0
    assert (tmp_path / "notes.txt").exists()

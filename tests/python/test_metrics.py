"""The Prometheus endpoint, scraped after real calls: counts, durations, sessions,
kept bytes and tensor bytes move as the calls say they should."""
import time

import numpy as np
import pytest
import tritonclient.grpc as tc

from layerd_server import Server
from test_numpy_conformance import to_tensor


@pytest.fixture(scope="module")
def metered():
    s = Server("--metrics-addr", "127.0.0.1:0")
    yield s
    assert s.stop() == 0


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_real_calls(metered, pb):
    pb2, pb2_grpc = pb
    before = metered.metrics()
    x = np.linspace(-1, 1, 1024, dtype=np.float32)
    with metered.channel() as channel:
        stub = pb2_grpc.LayerServiceStub(channel)
        sid = stub.CreateSession(pb2.CreateSessionRequest()).session_id
        stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="l", kind="sigmoid"))
        stub.Forward(pb2.ForwardRequest(session_id=sid, layer_id="l", x=to_tensor(pb2, x)))
        during = metered.metrics()
        stub.Backward(pb2.BackwardRequest(session_id=sid, layer_id="l", dout=to_tensor(pb2, x)))
        with pytest.raises(Exception):
            stub.Forward(pb2.ForwardRequest(session_id="nope", layer_id="l", x=to_tensor(pb2, x)))
        stub.CloseSession(pb2.CloseSessionRequest(session_id=sid))
        stub.CreateSession(pb2.CreateSessionRequest(session_id="brief", idle_timeout_seconds=1))
    client = tc.InferenceServerClient(metered.addr)
    i = tc.InferInput("x", [1024], "FP32")
    i.set_data_from_numpy(x)
    client.infer("relu", [i], sequence_id=11, sequence_start=True, sequence_end=True)
    time.sleep(2.5)  # "brief" expires
    after = metered.metrics()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    calls = "layerd_calls_total"
    assert delta(calls, method="CreateSession", kind="", code="OK") == 2
    assert delta(calls, method="CreateLayer", kind="sigmoid", code="OK") == 1
    assert delta(calls, method="Forward", kind="sigmoid", code="OK") == 1
    assert delta(calls, method="Backward", kind="sigmoid", code="OK") == 1
    assert delta(calls, method="Forward", kind="", code="NotFound") == 1
    assert delta(calls, method="ModelInfer", kind="relu", code="OK") == 1
    assert delta("layerd_call_duration_seconds_count", method="Forward", kind="sigmoid") == 1
    assert delta("layerd_call_duration_seconds_sum", method="Forward", kind="sigmoid") > 0
    assert delta("layerd_call_duration_seconds_bucket", method="Forward", kind="sigmoid", le="+Inf") == 1
    # 4 KiB in per Forward, Backward and ModelInfer (the failed Forward's x was received too), 4 KiB out each.
    assert delta("layerd_tensor_bytes_total", direction="in") == 4 * 4096
    assert delta("layerd_tensor_bytes_total", direction="out") == 3 * 4096
    # Sigmoid keeps y (4 KiB) while its session is open; nothing once it closed.
    assert value(during, "layerd_kept_bytes") - value(before, "layerd_kept_bytes") == 4096
    assert value(after, "layerd_kept_bytes") == value(before, "layerd_kept_bytes")
    assert value(during, "layerd_sessions_open") - value(before, "layerd_sessions_open") == 1
    assert value(after, "layerd_sessions_open") == value(before, "layerd_sessions_open")
    assert delta("layerd_sessions_ended_total", cause="closed") == 2  # CloseSession, sequence_end
    assert delta("layerd_sessions_ended_total", cause="idle") == 1


def test_metrics_are_off_unless_asked_for(server):
    assert not any("metrics serving" in line for line in server.log)

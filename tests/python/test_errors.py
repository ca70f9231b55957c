"""Every error case answers with its gRPC code and a google.rpc.ErrorInfo reason,
seen from a plain grpcio client (details decoded with grpcio-status)."""
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from layerd_server import Server


def details(error):
    """(code, ErrorInfo.reason, message) of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status on {error}"
    reasons = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "layerd.v1"
            reasons.append(info.reason)
    assert len(reasons) == 1, status
    return error.code(), reasons[0], error.details()


def expect(call, code, reason, *words):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    got_code, got_reason, message = details(caught.value)
    assert (got_code, got_reason) == (code, reason), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.fixture(scope="module")
def api(pb, stub):
    pb2, _ = pb
    stub.CreateSession(pb2.CreateSessionRequest(session_id="err"))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="err", layer_id="relu", kind="relu"))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="err", layer_id="sig", kind="sigmoid"))
    return pb2, stub


def f32(pb2, values, shape=None):
    a = np.asarray(values, dtype="<f4")
    return pb2.Tensor(dtype=pb2.DTYPE_FLOAT32, shape=list(shape if shape is not None else a.shape), data=a.tobytes())


def fwd(pb2, stub, x, sid="err", lid="relu"):
    return lambda: stub.Forward(pb2.ForwardRequest(session_id=sid, layer_id=lid, x=x))


def bwd(pb2, stub, dout, sid="err", lid="relu"):
    return lambda: stub.Backward(pb2.BackwardRequest(session_id=sid, layer_id=lid, dout=dout))


NOT_FOUND, EXISTS, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT


def test_not_found(api):
    pb2, stub = api
    x = f32(pb2, [1.0])
    expect(fwd(pb2, stub, x, sid="nope"), NOT_FOUND, "SESSION_NOT_FOUND", "nope")
    expect(bwd(pb2, stub, x, sid="nope"), NOT_FOUND, "SESSION_NOT_FOUND", "nope")
    expect(lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id="nope", layer_id="l", kind="relu")),
           NOT_FOUND, "SESSION_NOT_FOUND")
    expect(lambda: stub.CloseSession(pb2.CloseSessionRequest(session_id="nope")), NOT_FOUND, "SESSION_NOT_FOUND")
    expect(fwd(pb2, stub, x, lid="other"), NOT_FOUND, "LAYER_NOT_FOUND", "other")
    stub.CreateSession(pb2.CreateSessionRequest(session_id="closing"))
    stub.CloseSession(pb2.CloseSessionRequest(session_id="closing"))
    expect(fwd(pb2, stub, x, sid="closing"), NOT_FOUND, "SESSION_NOT_FOUND", "closing")


def test_an_expired_session_is_not_found(api):
    pb2, stub = api
    granted = stub.CreateSession(pb2.CreateSessionRequest(session_id="brief", idle_timeout_seconds=1))
    assert granted.idle_timeout_seconds == 1
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="brief", layer_id="l", kind="relu"))
    time.sleep(1.3)
    expect(fwd(pb2, stub, f32(pb2, [1.0]), sid="brief", lid="l"), NOT_FOUND, "SESSION_NOT_FOUND", "expired")


def test_already_exists(api):
    pb2, stub = api
    expect(lambda: stub.CreateSession(pb2.CreateSessionRequest(session_id="err")), EXISTS, "SESSION_EXISTS")
    expect(lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id="err", layer_id="relu", kind="sigmoid")),
           EXISTS, "LAYER_EXISTS")


def test_invalid_ids_and_kind(api):
    pb2, stub = api
    for bad in ["a b", "x" * 129, "ü"]:
        expect(lambda: stub.CreateSession(pb2.CreateSessionRequest(session_id=bad)), INVALID, "INVALID_ID", "session_id")
    expect(lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id="err", layer_id="a/b", kind="relu")),
           INVALID, "INVALID_ID", "layer_id")
    expect(lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id="err", layer_id="t", kind="tanh")),
           INVALID, "UNKNOWN_KIND", "identity, pooling, relu, sequential", "tanh")


@pytest.mark.parametrize("case", [
    ("missing", None, "MISSING_TENSOR", ["x"]),
    ("unspecified", dict(dtype=0, shape=[1], data=b"\0" * 4), "INVALID_TENSOR", ["x.dtype", "DTYPE_UNSPECIFIED"]),
    ("unknown dtype", dict(dtype=9, shape=[1], data=b"\0" * 4), "INVALID_TENSOR", ["x.dtype", "9"]),
    ("rank 9", dict(dtype=1, shape=[1] * 9, data=b"\0" * 4), "INVALID_TENSOR", ["x.shape", "9 dimensions"]),
    ("overflow", dict(dtype=2, shape=[1 << 40, 1 << 40], data=b""), "INVALID_TENSOR", ["x.shape", "overflows"]),
    ("short data", dict(dtype=1, shape=[2, 2], data=b"\0" * 15), "INVALID_TENSOR", ["x.data", "16 bytes", "got 15"]),
    ("long data", dict(dtype=2, shape=[], data=b"\0" * 9), "INVALID_TENSOR", ["x.data", "8 bytes", "got 9"]),
], ids=lambda c: c[0])
def test_tensor_defects(api, case):
    pb2, stub = api
    _, fields, reason, words = case
    x = pb2.Tensor(**fields) if fields is not None else None
    expect(fwd(pb2, stub, x), INVALID, reason, *words)


def test_dout_must_match_the_kept_forward(api):
    pb2, stub = api
    stub.Forward(pb2.ForwardRequest(session_id="err", layer_id="relu", x=f32(pb2, [1.0, -1.0])))
    expect(bwd(pb2, stub, f32(pb2, [1.0, 1.0, 1.0])), INVALID, "DOUT_MISMATCH", "dout", "[2]", "[3]")
    d64 = pb2.Tensor(dtype=pb2.DTYPE_FLOAT64, shape=[2], data=np.ones(2).tobytes())
    expect(bwd(pb2, stub, d64), INVALID, "DOUT_MISMATCH", "DTYPE_FLOAT64")
    # The failures changed nothing.
    dx = stub.Backward(pb2.BackwardRequest(session_id="err", layer_id="relu", dout=f32(pb2, [2.0, 2.0]))).dx
    assert np.frombuffer(dx.data, "<f4").tolist() == [2.0, 0.0]


def test_routing_header_must_match(api):
    pb2, stub = api
    call = lambda: stub.Forward(pb2.ForwardRequest(session_id="err", layer_id="relu", x=f32(pb2, [1.0])),
                                metadata=[("x-session-id", "someone-else")])
    expect(call, INVALID, "SESSION_HEADER_MISMATCH", "x-session-id", "someone-else")
    stub.Forward(pb2.ForwardRequest(session_id="err", layer_id="relu", x=f32(pb2, [1.0])), metadata=[("x-session-id", "err")])


def test_backward_with_nothing_kept(api):
    pb2, stub = api
    expect(bwd(pb2, stub, f32(pb2, [1.0]), lid="sig"), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_KEPT", "sig")
    stub.Forward(pb2.ForwardRequest(session_id="err", layer_id="sig", x=f32(pb2, [1.0]), no_grad=True))
    expect(bwd(pb2, stub, f32(pb2, [1.0]), lid="sig"), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_KEPT")


def test_a_message_over_the_default_64_mib_limit(api):
    pb2, stub = api
    x = pb2.Tensor(dtype=pb2.DTYPE_FLOAT32, shape=[(65 << 20) // 4], data=bytes(65 << 20))
    expect(fwd(pb2, stub, x), grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", "--max-message-bytes")


def test_limits_are_resource_exhausted(pb):
    pb2, pb2_grpc = pb
    server = Server("--max-sessions=1", "--max-layers-per-session=1", "--max-session-kept-bytes=1KiB")
    try:
        with server.channel() as channel:
            stub = pb2_grpc.LayerServiceStub(channel)
            stub.CreateSession(pb2.CreateSessionRequest(session_id="only"))
            expect(lambda: stub.CreateSession(pb2.CreateSessionRequest(session_id="two")),
                   grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", "--max-sessions")
            stub.CreateLayer(pb2.CreateLayerRequest(session_id="only", layer_id="s", kind="sigmoid"))
            expect(lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id="only", layer_id="t", kind="relu")),
                   grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", "--max-layers-per-session")
            expect(fwd(pb2, stub, f32(pb2, np.ones(257)), sid="only", lid="s"),
                   grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", "--max-session-kept-bytes")
            stub.Forward(pb2.ForwardRequest(session_id="only", layer_id="s", x=f32(pb2, np.ones(256))))
    finally:
        assert server.stop() == 0

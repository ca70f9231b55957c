"""The Python client against a real server: numpy equivalence, typed errors, chains, streams."""
import time

import grpc
import numpy as np
import pytest

import layerd
from layerd_server import Server
from reference import Relu, Sigmoid


def bits(a):
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 1, 3, 1, 2), (1 << 20,)])
def test_relu_and_sigmoid_match_numpy(client, dtype, shape):
    rng = np.random.default_rng(7)
    x = np.array(rng.standard_normal(shape) * 50, dtype=dtype)
    if x.size > 8:
        x.flat[:8] = [np.nan, -0.0, 0.0, np.inf, -np.inf, 88.8, -88.8, -710.0]
    dout = np.array(rng.standard_normal(shape), dtype=dtype)
    with client.session() as s:
        relu, sig = s.layer("relu"), s.layer("sigmoid")
        ref_relu, ref_sig = Relu(), Sigmoid()
        with np.errstate(all="ignore"):
            y = relu.forward(x)
            assert y.dtype == dtype and y.shape == x.shape and y.flags.writeable
            assert np.array_equal(bits(y), bits(ref_relu.forward(x.copy())))
            assert np.array_equal(bits(relu.backward(dout)), bits(ref_relu.backward(dout.copy())))

            ys = sig.forward(x)
            want = ref_sig.forward(x.copy())
            tolerance = 1e-6 if dtype == np.float32 else 1e-14
            close = (ys == want) | (np.abs(ys - want) <= tolerance * np.abs(want))
            assert np.array_equal(np.isnan(ys), np.isnan(x)) and np.all(close | np.isnan(x))
            ref_sig.out = ys.copy()
            assert np.array_equal(bits(sig.backward(dout)), bits(ref_sig.backward(dout.copy())))


def test_half_precision_travels_as_half_and_computes_in_float32(client):
    """float16 and bfloat16 arrays go as such and come back in their dtype: ReLU bit for bit; a
    layer created with a half dtype keeps float32 parameters."""
    import ml_dtypes
    rng = np.random.default_rng(9)
    with client.session() as s:
        relu = s.layer("relu")
        fc = s.layer("affine", in_features=4, out_features=3, dtype=np.float16,
                     params={"W": np.eye(4, 3, dtype=np.float16), "b": np.zeros(3, np.float16)})
        assert {v.dtype for v in fc.params().values()} == {np.dtype(np.float32)}
        for half in (np.float16, ml_dtypes.bfloat16):
            x = rng.standard_normal((5, 4)).astype(half)
            y = relu.forward(x)
            assert y.dtype == half and np.array_equal(y.view(np.uint16), np.where(x > 0, x, 0).astype(half).view(np.uint16))
            # W = I: y = x[:, :3], exactly representable, so exact after rounding.
            assert fc.forward(x).dtype == half and np.array_equal(fc.forward(x), x[:, :3])


def test_a_two_layer_chain(client):
    rng = np.random.default_rng(8)
    x, dout = rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    with client.session() as s:
        l1, l2 = s.layer("relu"), s.layer("sigmoid")
        y = l2.forward(l1.forward(x))
        dx = l1.backward(l2.backward(dout))
    h = np.where(x > 0, x, 0.0)
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-h)), rtol=1e-14)
    assert np.array_equal(dx, np.where(x > 0, dout * (1.0 - y) * y, 0.0))


def test_run_streams_steps_in_order(client):
    x = np.array([[1.0, -1.0], [-2.0, 3.0]], dtype=np.float32)
    with client.session() as s:
        relu = s.layer("relu")
        y, dx, y_ng, dx2 = s.run([("forward", relu, x), ("backward", relu, np.full_like(x, 2.0)),
                                  ("forward_no_grad", relu, -x), ("backward", relu, np.ones_like(x))])
    assert y.tolist() == [[1.0, 0.0], [0.0, 3.0]]
    assert dx.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    assert y_ng.tolist() == [[0.0, 1.0], [2.0, 0.0]]
    assert dx2.tolist() == [[1.0, 0.0], [0.0, 1.0]], "no_grad left the mask alone"


def test_kinds_and_session_lifecycle(client):
    assert set(client.kinds()) == {"affine", "batch_norm", "convolution", "dropout", "identity", "pooling", "relu",
                                   "sequential", "sigmoid", "softmax_with_loss"}
    s = client.session(idle_timeout=30, session_id="py-life")
    assert (s.id, s.idle_timeout) == ("py-life", 30)
    relu = s.layer("relu", layer_id="act")
    assert (relu.id, relu.kind) == ("act", "relu")
    s.close()
    with pytest.raises(layerd.NotFound) as caught:
        relu.forward(np.ones(2, np.float32))
    assert caught.value.reason == "SESSION_NOT_FOUND" and caught.value.code == grpc.StatusCode.NOT_FOUND


def test_every_error_is_a_typed_exception(client):
    with client.session(session_id="py-errors") as s:
        relu = s.layer("relu", layer_id="r")
        cases = [
            (lambda: client.session(session_id="py-errors"), layerd.AlreadyExists, "SESSION_EXISTS"),
            (lambda: s.layer("relu", layer_id="r"), layerd.AlreadyExists, "LAYER_EXISTS"),
            (lambda: s.layer("tanh"), layerd.InvalidArgument, "UNKNOWN_KIND"),
            (lambda: s.layer("relu", layer_id="bad id"), layerd.InvalidArgument, "INVALID_ID"),
            (lambda: relu.backward(np.ones(2, np.float32)), layerd.FailedPrecondition, "NOTHING_KEPT"),
            (lambda: layerd.Layer(s, "nope", "relu").forward(np.ones(1)), layerd.NotFound, "LAYER_NOT_FOUND"),
        ]
        for call, error, reason in cases:
            with pytest.raises(error) as caught:
                call()
            assert caught.value.reason == reason, caught.value
        relu.forward(np.ones(2, np.float32))
        with pytest.raises(layerd.InvalidArgument) as caught:
            relu.backward(np.ones(3, np.float32))
        assert caught.value.reason == "DOUT_MISMATCH"
        assert caught.value.violations[0][0] == "dout"
        with pytest.raises(TypeError, match="float32, float64, float16 and bfloat16"):
            relu.forward(np.ones(2, dtype=np.int32))
        # int64 goes on the wire (class ids are int64), and the server names x's dtype.
        with pytest.raises(layerd.InvalidArgument) as caught:
            relu.forward(np.ones(2, dtype=np.int64))
        assert caught.value.violations[0][0] == "x.dtype"
        with pytest.raises(layerd.InvalidArgument) as caught:
            s.run([("forward", relu, np.ones(2, np.float32)), ("backward", relu, np.ones(5, np.float32))])
        assert caught.value.reason == "DOUT_MISMATCH"


def test_limits_and_deadlines_are_typed():
    server = Server("--max-sessions=1", "--request-timeout=5ms")
    try:
        with layerd.Client(server.addr, max_message_bytes=128 << 20) as client:
            s = client.session()
            with pytest.raises(layerd.ResourceExhausted) as caught:
                client.session()
            assert caught.value.metadata["limit"] == "--max-sessions"
            sig = s.layer("sigmoid")
            with pytest.raises(layerd.DeadlineExceeded):
                sig.forward(np.zeros(6 << 20))
    finally:
        assert server.stop() == 0


def test_a_token_authenticates_and_keeps_sessions_apart(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token-0123456789 alice\nbob-token-0123456789ab bob\n")
    server = Server(f"--auth-tokens={tokens}")
    try:
        with layerd.Client(server.addr) as anonymous:
            with pytest.raises(layerd.Unauthenticated) as caught:
                anonymous.kinds()
            assert caught.value.reason == "MISSING_TOKEN"
        with layerd.Client(server.addr, token="wrong-token-0123456789") as stranger:
            with pytest.raises(layerd.Unauthenticated) as caught:
                stranger.session()
            assert caught.value.reason == "INVALID_TOKEN"
        with layerd.Client(server.addr, token="alice-token-0123456789") as alice, \
                layerd.Client(server.addr, token="bob-token-0123456789ab") as bob:
            assert "relu" in alice.kinds()
            with alice.session(session_id="shared-name") as mine:
                relu = mine.layer("relu", layer_id="l")
                relu.forward(np.array([-1.0, 2.0]))
                # Bob's session of that name is his own: his layer "l" kept nothing.
                with bob.session(session_id="shared-name") as theirs:
                    with pytest.raises(layerd.FailedPrecondition):
                        theirs.layer("relu", layer_id="l").backward(np.ones(2))
                assert relu.backward(np.ones(2)).tolist() == [0.0, 1.0]
    finally:
        assert server.stop() == 0


def test_an_unreachable_server_is_unavailable():
    with layerd.Client("127.0.0.1:1", timeout=2) as client:
        started = time.monotonic()
        with pytest.raises(layerd.Unavailable):
            client.kinds()
        # Refused at once, retried with the default backoffs (at most 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s).
        retry = layerd.Retry()
        waits = sum(min(retry.max_backoff, retry.initial_backoff * retry.multiplier ** n) for n in range(retry.attempts - 1))
        assert time.monotonic() - started < waits + 2


def test_installs_and_runs_beside_tritonclient(client):
    """Teams compare layerd with Triton: both clients must live in one environment
    (tritonclient pins protobuf < 7, so the stubs are generated for protobuf 6.33+)."""
    import google.protobuf
    import tritonclient.grpc as triton

    triton.InferInput("x", [2], "FP32")  # tritonclient's own generated code loads
    with client.session() as s:
        assert s.layer("relu").forward(np.array([-1.0, 2.0])).tolist() == [0.0, 2.0]
    assert int(google.protobuf.__version__.split(".")[0]) in (6, 7)


@pytest.mark.parametrize("x, t", [
    (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0, 2, 1])),
    (np.float64(2.5), np.array(3)),                                      # 0-d
    (np.zeros((0, 5)), np.zeros(0, dtype=np.int64)),                     # empty
    (np.arange(6.0).reshape(2, 3).T, np.ones((3, 2), "f4")),            # transposed: not C order
    (np.random.default_rng(0).standard_normal((200, 300)), np.arange(200)),  # lengths past one varint byte
])
@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_requests_serialized_by_hand_parse_as_protobuf_builds_them(x, t, flags):
    """Forward, Backward and TrainStep requests are serialized by hand (each tensor copied once):
    they must be the messages the protobuf classes build, for any dtype, shape and layout, with
    a tensor left out when None."""
    from layerd.client import _serialized
    from layerd.v1 import layerd_pb2 as pb
    head = dict(session_id="s" * 40, layer_id="net", optimizer_id="opt", return_dx=flags[0], return_scores=flags[1])
    wire = _serialized(pb.TrainStepRequest(**head), x=x, t=t)
    assert pb.TrainStepRequest.FromString(wire) == pb.TrainStepRequest(**head, x=layerd.to_tensor(x), t=layerd.to_tensor(t))
    wire = _serialized(pb.ForwardRequest(session_id="s", layer_id="net", no_grad=flags[0]), x=x, t=None)
    assert pb.ForwardRequest.FromString(wire) == pb.ForwardRequest(session_id="s", layer_id="net", no_grad=flags[0],
                                                                   x=layerd.to_tensor(x))
    assert not pb.ForwardRequest.FromString(wire).HasField("t")
    wire = _serialized(pb.BackwardRequest(session_id="s", layer_id="net"), dout=t)
    assert pb.BackwardRequest.FromString(wire) == pb.BackwardRequest(session_id="s", layer_id="net", dout=layerd.to_tensor(t))
    with pytest.raises(TypeError):
        _serialized(pb.ForwardRequest(), x=np.asarray(x).astype(np.int32))

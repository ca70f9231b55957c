"""Half precision on the wire: float16 and bfloat16 tensors through a plain grpcio client.

The server widens a half tensor to float32, computes in float32 and rounds its answer to the
request's dtype (to nearest, ties to even). The reference is the same: the tests' numpy layers in
float32 on the widened inputs, then rounded (numpy's float16, ml_dtypes' bfloat16). ReLU must be
bit-exact; everything else within one unit in the last place of the half type. Parameters of a
layer created with a half dtype are float32 (GetParams answers float32), and a dout must come in
the dtype of the kept Forward's y.
"""
import uuid

import grpc
import ml_dtypes
import numpy as np
import pytest

import reference
import reference_training as ref
from test_numpy_conformance import sample
from test_training_step import code_and_reason

HALVES = {"f16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}


def wire_dtype(pb2, dtype):
    return {np.dtype(np.float16): pb2.DTYPE_FLOAT16, np.dtype(ml_dtypes.bfloat16): pb2.DTYPE_BFLOAT16,
            np.dtype(np.float32): pb2.DTYPE_FLOAT32, np.dtype(np.float64): pb2.DTYPE_FLOAT64,
            np.dtype(np.int64): pb2.DTYPE_INT64}[np.dtype(dtype)]


def to_tensor(pb2, a):
    a = np.ascontiguousarray(a)
    return pb2.Tensor(dtype=wire_dtype(pb2, a.dtype), shape=list(a.shape), data=a.tobytes())


def from_tensor(pb2, t):
    dtype = {pb2.DTYPE_FLOAT16: np.dtype(np.float16), pb2.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
             pb2.DTYPE_FLOAT32: np.dtype("<f4"), pb2.DTYPE_FLOAT64: np.dtype("<f8")}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


def ulps(ours, want):
    """The most units in the last place between two half arrays of the same dtype (NaN only
    with NaN); at most one, and equal almost everywhere, where the float32 results agree."""
    assert ours.dtype == want.dtype and ours.shape == want.shape, (ours.dtype, want.dtype, ours.shape, want.shape)
    a, b = ours.view(np.uint16).astype(np.int64), want.view(np.uint16).astype(np.int64)
    nan_a, nan_b = np.isnan(ours.astype(np.float32)), np.isnan(want.astype(np.float32))
    assert (nan_a == nan_b).all(), "NaN where the reference has none, or the other way round"
    # Sign-magnitude to a monotonic integer line, so -0 and +0 are one apart and ulps count across 0.
    line = lambda bits: np.where(bits & 0x8000, -(bits & 0x7FFF), bits)  # noqa: E731
    apart = np.abs(line(a) - line(b))[~nan_a]
    # Rounding the same float32 values the same way (to nearest, ties to even, not truncating):
    # only the few results whose float32 values differ can round apart.
    assert apart.size == 0 or (apart == 0).mean() > 0.99, f"{(apart != 0).mean():.2%} differ"
    return apart.max(initial=0)


def half_sample(half, shape, seed):
    """Random values of `shape` in the half type, with its special values mixed in."""
    with np.errstate(over="ignore"):  # out of the half range: ±inf, as a client would send
        x = sample(shape, np.float32, seed).astype(half)
    info = ml_dtypes.finfo(half)
    specials = np.array([info.max, -info.max, info.tiny, -info.tiny, info.smallest_subnormal, 65504, 7.0],
                        dtype=np.float32).astype(half)
    x.reshape(-1)[-len(specials):] = specials
    return x


def session(pb2, stub):
    return stub.CreateSession(pb2.CreateSessionRequest(session_id=uuid.uuid4().hex)).session_id


def forward(pb2, stub, sid, layer, x, t=None):
    request = pb2.ForwardRequest(session_id=sid, layer_id=layer, x=to_tensor(pb2, x))
    if t is not None:
        request.t.CopyFrom(to_tensor(pb2, t))
    return from_tensor(pb2, stub.Forward(request).y)


def backward(pb2, stub, sid, layer, dout=None):
    request = pb2.BackwardRequest(session_id=sid, layer_id=layer)
    if dout is not None:
        request.dout.CopyFrom(to_tensor(pb2, dout))
    return from_tensor(pb2, stub.Backward(request).dx)


@pytest.mark.parametrize("half", HALVES.values(), ids=HALVES.keys())
def test_relu_is_bit_exact_and_sigmoid_within_one_ulp(pb, stub, half):
    pb2, _ = pb
    sid = session(pb2, stub)
    for kind in ("relu", "sigmoid"):
        stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id=kind, kind=kind))
    x, dout = half_sample(half, (64, 300), 1), half_sample(half, (64, 300), 2)
    # The reference: the classic layers in float32 on the widened inputs, then rounded.
    relu, sigmoid = reference.Relu(), reference.Sigmoid()
    want_y = relu.forward(x.astype(np.float32)).astype(half)
    want_dx = relu.backward(dout.astype(np.float32)).astype(half)
    y = forward(pb2, stub, sid, "relu", x)
    assert y.dtype == half and (y.view(np.uint16) == want_y.view(np.uint16)).all()
    dx = backward(pb2, stub, sid, "relu", dout)
    assert dx.dtype == half and (dx.view(np.uint16) == want_dx.view(np.uint16)).all()
    with np.errstate(over="ignore", invalid="ignore"):
        want_y = sigmoid.forward(x.astype(np.float32))
        want_dx = sigmoid.backward(dout.astype(np.float32)).astype(half)
    assert ulps(forward(pb2, stub, sid, "sigmoid", x), want_y.astype(half)) <= 1
    assert ulps(backward(pb2, stub, sid, "sigmoid", dout), want_dx) <= 1


@pytest.mark.parametrize("half", HALVES.values(), ids=HALVES.keys())
def test_a_layer_created_in_half_keeps_float32_parameters_and_answers_in_half(pb, stub, half):
    """affine → relu → affine → softmax_with_loss created with a half dtype and half params:
    its parameters, gradients and optimizer state are float32; Forward, Backward and TrainStep
    answer in the request's half dtype, within one ulp of the float32 reference."""
    pb2, _ = pb
    sid = session(pb2, stub)
    r = np.random.default_rng(3)
    member = lambda name, kind, **c: pb2.LayerSpec(name=name, kind=kind, config=pb2.LayerConfig(**c))  # noqa: E731
    config = pb2.LayerConfig(sequential=pb2.SequentialConfig(layers=[
        member("fc1", "affine", affine=pb2.AffineConfig(in_features=20, out_features=16)),
        member("relu", "relu"),
        member("fc2", "affine", affine=pb2.AffineConfig(in_features=16, out_features=5)),
        member("loss", "softmax_with_loss")]))
    params = {"fc1.W": r.standard_normal((20, 16)) * 0.3, "fc1.b": r.standard_normal(16) * 0.1,
              "fc2.W": r.standard_normal((16, 5)) * 0.3, "fc2.b": r.standard_normal(5) * 0.1}
    params = {k: v.astype(half) for k, v in params.items()}
    request = pb2.CreateLayerRequest(session_id=sid, layer_id="net", kind="sequential", config=config,
                                     dtype=wire_dtype(pb2, half))
    for name, value in params.items():
        request.params[name].CopyFrom(to_tensor(pb2, value))
    stub.CreateLayer(request)
    got = stub.GetParams(pb2.GetParamsRequest(session_id=sid, layer_id="net")).params
    for name, value in params.items():
        assert got[name].dtype == pb2.DTYPE_FLOAT32
        assert (from_tensor(pb2, got[name]) == value.astype(np.float32)).all(), name

    x = r.standard_normal((8, 20)).astype(half)
    probabilities = r.dirichlet(np.ones(5), 8).astype(half)
    wide = {k: v.astype(np.float32) for k, v in params.items()}
    net = ref.Sequential([("fc1", ref.Affine(wide["fc1.W"], wide["fc1.b"])), ("relu", ref.Relu()),
                          ("fc2", ref.Affine(wide["fc2.W"], wide["fc2.b"])), ("loss", ref.SoftmaxWithLoss())])
    want_loss = net.forward(x.astype(np.float32), t=probabilities.astype(np.float32))
    loss = forward(pb2, stub, sid, "net", x, probabilities)
    assert loss.dtype == half and loss.shape == ()
    assert ulps(loss, np.asarray(want_loss).astype(half)) <= 1
    want_dx = net.backward().astype(half)
    assert ulps(backward(pb2, stub, sid, "net"), want_dx) <= 1
    grads = stub.GetParams(pb2.GetParamsRequest(session_id=sid, layer_id="net", include_grads=True)).grads
    assert {g.dtype for g in grads.values()} == {pb2.DTYPE_FLOAT32}
    want_dw = net.grads()["fc1.W"]
    dw = from_tensor(pb2, grads["fc1.W"])
    assert np.abs(dw - want_dw).max() <= 1e-5 * np.abs(want_dw).max()

    # A TrainStep with half x and t: its dx is half, and Adam's state is float32 (the export's).
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="adam", adam=pb2.Adam()))
    answer = stub.TrainStep(pb2.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="adam",
                                                 x=to_tensor(pb2, x), t=to_tensor(pb2, probabilities),
                                                 return_dx=True, return_scores=True))
    assert answer.dx.dtype == answer.scores.dtype == wire_dtype(pb2, half)
    assert from_tensor(pb2, answer.dx).shape == (8, 20) and from_tensor(pb2, answer.scores).shape == (8, 5)
    from safetensors.numpy import load
    exported = load(stub.ExportSession(pb2.ExportSessionRequest(session_id=sid)).safetensors)
    assert {v.dtype for v in exported.values()} == {np.dtype(np.float32)}, {k: v.dtype for k, v in exported.items()}


def test_half_errors_name_the_dtypes(pb, stub):
    pb2, _ = pb
    sid = session(pb2, stub)
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="relu", kind="relu"))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="fc", kind="affine", dtype=pb2.DTYPE_FLOAT64,
                                            config=pb2.LayerConfig(affine=pb2.AffineConfig(in_features=3, out_features=2))))
    forward(pb2, stub, sid, "relu", np.ones((2, 3), np.float16))
    cases = [
        # dout must come as the kept Forward's y did.
        (lambda: backward(pb2, stub, sid, "relu", np.ones((2, 3), np.float32)),
         "DOUT_MISMATCH", ["dout", "DTYPE_FLOAT16[2, 3]", "DTYPE_FLOAT32[2, 3]"]),
        # A float64 layer takes float64 only.
        (lambda: forward(pb2, stub, sid, "fc", np.ones((2, 3), ml_dtypes.bfloat16)),
         "DTYPE_MISMATCH", ["x.dtype", "DTYPE_FLOAT64", "DTYPE_BFLOAT16"]),
        # Two bytes per element.
        (lambda: stub.Forward(pb2.ForwardRequest(session_id=sid, layer_id="relu", x=pb2.Tensor(
            dtype=pb2.DTYPE_FLOAT16, shape=[3], data=b"\0" * 7))),
         "INVALID_TENSOR", ["x.data", "6 bytes", "DTYPE_FLOAT16", "7 bytes"]),
    ]
    for call, reason, words in cases:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert code_and_reason(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, reason), caught.value.details()
        for word in words:
            assert word in caught.value.details(), (word, caught.value.details())


def test_kserve_fp16_through_tritonclient(server):
    """FP16 in raw contents through Triton's own client: the answer is FP16, bit-exact for relu;
    FP16 in typed contents (which KServe does not have) is refused naming raw_input_contents."""
    import tritonclient.grpc as triton
    from tritonclient.grpc import service_pb2 as tpb
    from tritonclient.grpc import service_pb2_grpc as tpb_grpc

    client = triton.InferenceServerClient(server.addr)
    x = half_sample(np.float16, (4, 1000), 5)
    inputs = [triton.InferInput("x", list(x.shape), "FP16")]
    inputs[0].set_data_from_numpy(x)
    y = client.infer("relu", inputs).as_numpy("y")
    assert y.dtype == np.float16
    want = reference.Relu().forward(x.astype(np.float32)).astype(np.float16)
    assert (y.view(np.uint16) == want.view(np.uint16)).all()
    bad = tpb.ModelInferRequest(model_name="relu")
    tensor = bad.inputs.add(name="x", datatype="FP16", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in caught.value.details() and "FP16" in caught.value.details()

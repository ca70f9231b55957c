"""Bad input, table-driven: every defect class against one live server, native API
and KServe alike, each answered with its documented code and reason — and at the
end the server is still serving and its log holds no panic. Prints
"N classes, 0 panics".

Unknown protobuf fields and gzip-compressed requests are not defects: they are
accepted (the last rows)."""
import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from layerd_server import Server
from test_errors import details

INVALID, NOT_FOUND, FAILED, EXHAUSTED, EXISTS = (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS)


@pytest.fixture(scope="module")
def target(pb):
    pb2, pb2_grpc = pb
    server = Server("--max-message-bytes", "1MiB", "--max-work-bytes", "1MiB")
    channel = server.channel()
    stub, kstub = pb2_grpc.LayerServiceStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
    stub.CreateSession(pb2.CreateSessionRequest(session_id="bad"))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="bad", layer_id="r", kind="relu"))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="bad", layer_id="fresh", kind="relu"))
    stub.Forward(pb2.ForwardRequest(session_id="bad", layer_id="r", x=f32(pb2)))  # "r" keeps a mask of 4
    # "aff": affine 4 -> 2 in float64; "sm": a loss; "conv": a 30x30 kernel
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="bad", layer_id="aff", kind="affine", dtype=pb2.DTYPE_FLOAT64,
                                            config=pb2.LayerConfig(affine=pb2.AffineConfig(in_features=4, out_features=2))))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="bad", layer_id="sm", kind="softmax_with_loss"))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id="bad", layer_id="conv", kind="convolution", config=pb2.LayerConfig(
        convolution=pb2.ConvolutionConfig(in_channels=1, out_channels=1, kernel_h=30, kernel_w=30))))
    yield pb2, stub, kstub, server
    channel.close()
    assert server.stop() == 0


def f32(pb2, n=4, shape=None, dtype=None, data=None):
    a = np.arange(n, dtype="<f4") - 1
    return pb2.Tensor(dtype=pb2.DTYPE_FLOAT32 if dtype is None else dtype,
                      shape=[n] if shape is None else shape, data=a.tobytes() if data is None else data)


def kreq(model="relu", name="x", datatype="FP32", shape=(4,), raw=(b"\0" * 16,), params=None, contents=None):
    r = kpb.ModelInferRequest(model_name=model, raw_input_contents=list(raw))
    t = r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if contents is not None:
        t.contents.CopyFrom(contents)
    for k, v in (params or {}).items():
        setattr(r.parameters[k], v[0], v[1])
    return r


def f64(pb2, shape, values=None):
    a = np.zeros(shape, "<f8") if values is None else np.asarray(values, "<f8").reshape(shape)
    return pb2.Tensor(dtype=pb2.DTYPE_FLOAT64, shape=list(shape), data=a.tobytes())


def i64(pb2, values):
    return pb2.Tensor(dtype=pb2.DTYPE_INT64, shape=[len(values)], data=np.asarray(values, "<i8").tobytes())


def training_cases(pb2, stub):
    """(class, call, code, reason, field) for the trainable layers."""
    def create(kind, layer_id="new", **kw):
        return lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id="bad", layer_id=layer_id, kind=kind, **kw))
    cfg = pb2.LayerConfig
    affine = cfg(affine=pb2.AffineConfig(in_features=4, out_features=2))
    member = lambda name, kind: pb2.LayerSpec(name=name, kind=kind)  # noqa: E731
    sequential = lambda *m: cfg(sequential=pb2.SequentialConfig(layers=list(m)))  # noqa: E731
    fwd = lambda layer_id, **kw: lambda: stub.Forward(pb2.ForwardRequest(session_id="bad", layer_id=layer_id, **kw))  # noqa: E731
    scores = f64(pb2, (2, 3))
    setp = lambda values: lambda: stub.SetParams(pb2.SetParamsRequest(session_id="bad", layer_id="aff", values=values))  # noqa: E731
    return [
        ("config of another kind", create("affine", config=cfg(dropout=pb2.DropoutConfig())), INVALID,
         "INVALID_CONFIG", "config.affine"),
        ("config missing", create("convolution"), INVALID, "INVALID_CONFIG", "config.convolution"),
        ("config for a kind without hyperparameters", create("relu", config=affine), INVALID, "INVALID_CONFIG",
         "config.affine"),
        ("config value out of range", create("convolution", config=cfg(convolution=pb2.ConvolutionConfig(
            in_channels=1, out_channels=1, kernel_h=0, kernel_w=3))), INVALID, "INVALID_CONFIG",
         "config.convolution.kernel_h"),
        ("dropout ratio outside [0, 1)", create("dropout", config=cfg(dropout=pb2.DropoutConfig(ratio=1.0))), INVALID,
         "INVALID_CONFIG", "config.dropout.ratio"),
        ("pooling padding as large as the window", create("pooling", config=cfg(pooling=pb2.PoolingConfig(
            pool_h=2, pool_w=2, pad=2))), INVALID, "INVALID_CONFIG", "config.pooling.pad"),
        ("nested sequential", create("sequential", config=sequential(member("a", "sequential"))), INVALID,
         "INVALID_CONFIG", "config.sequential.layers[0].kind"),
        ("duplicate member names", create("sequential", config=sequential(member("a", "relu"), member("a", "relu"))),
         INVALID, "INVALID_CONFIG", "config.sequential.layers[1].name"),
        ("unknown param name", create("affine", config=affine, params={"V": f64(pb2, (4, 2))}), INVALID,
         "UNKNOWN_PARAM", 'params["V"]'),
        ("param of another shape", create("affine", config=affine, params={"W": f64(pb2, (2, 4))}), INVALID,
         "PARAM_MISMATCH", 'params["W"]'),
        ("params of two dtypes", create("affine", config=affine, params={"W": f64(pb2, (4, 2)), "b": f32(pb2, 2)}),
         INVALID, "PARAM_MISMATCH", 'params["b"].dtype'),
        ("layer dtype INT64", create("affine", config=affine, dtype=pb2.DTYPE_INT64), INVALID, "INVALID_CONFIG",
         "dtype"),
        ("parameters over the memory budget", create("affine", config=cfg(affine=pb2.AffineConfig(
            in_features=10**6, out_features=10**6))), EXHAUSTED, "LIMIT_EXCEEDED", "--max-session-kept-bytes"),
        ("x of another dtype than the parameters", fwd("aff", x=f32(pb2, 8, shape=[2, 4])), INVALID,
         "DTYPE_MISMATCH", "x.dtype"),
        ("x of a shape the layer cannot take", fwd("aff", x=f64(pb2, (2, 5))), INVALID, "SHAPE_MISMATCH", "x.shape"),
        ("convolution output smaller than 1x1", fwd("conv", x=f32(pb2, 4, shape=[1, 1, 2, 2])), INVALID,
         "SHAPE_MISMATCH", "x.shape"),
        ("x of dtype INT64", fwd("r", x=i64(pb2, [1, 2])), INVALID, "INVALID_TENSOR", "x.dtype"),
        ("loss without a target", fwd("sm", x=scores), INVALID, "MISSING_TENSOR", "t"),
        ("class id out of range", fwd("sm", x=scores, t=i64(pb2, [0, 3])), INVALID, "INVALID_TARGET", "t"),
        ("class ids of another count", fwd("sm", x=scores, t=i64(pb2, [0])), INVALID, "INVALID_TARGET", "t.shape"),
        ("probabilities of another dtype", fwd("sm", x=scores, t=f32(pb2, 6, shape=[2, 3])), INVALID,
         "INVALID_TARGET", "t"),
        ("a target for a layer without a loss", fwd("r", x=f32(pb2), t=i64(pb2, [0])), INVALID,
         "UNEXPECTED_TARGET", "t"),
        ("im2col over --max-work-bytes", fwd("conv", x=f32(pb2, 3600, shape=[1, 1, 60, 60])), EXHAUSTED,
         "LIMIT_EXCEEDED", "--max-work-bytes"),
        ("dout missing where no loss ran", lambda: stub.Backward(pb2.BackwardRequest(session_id="bad", layer_id="r")),
         INVALID, "MISSING_TENSOR", "dout"),
        ("SetParams of an unknown name", setp({"nope": f64(pb2, (2,))}), INVALID, "UNKNOWN_PARAM", 'values["nope"]'),
        ("SetParams of another shape", setp({"b": f64(pb2, (3,))}), INVALID, "PARAM_MISMATCH", 'values["b"]'),
    ]


def cases(pb2, stub, kstub):
    """(class, call, code, reason) — one row per defect class."""
    fwd = lambda **kw: lambda: stub.Forward(pb2.ForwardRequest(**{"session_id": "bad", "layer_id": "r", **kw}))  # noqa: E731
    bwd = lambda lid, t: lambda: stub.Backward(pb2.BackwardRequest(session_id="bad", layer_id=lid, dout=t))  # noqa: E731
    infer = lambda **kw: lambda: kstub.ModelInfer(kreq(**kw))  # noqa: E731
    return [
        ("tensor missing", fwd(), INVALID, "MISSING_TENSOR"),
        ("dtype unspecified", fwd(x=f32(pb2, dtype=0)), INVALID, "INVALID_TENSOR"),
        ("dtype unknown enum value", fwd(x=f32(pb2, dtype=7)), INVALID, "INVALID_TENSOR"),
        ("rank over 8", fwd(x=f32(pb2, 1, shape=[1] * 9)), INVALID, "INVALID_TENSOR"),
        ("shape overflows", fwd(x=f32(pb2, 1, shape=[2**62, 2**62])), INVALID, "INVALID_TENSOR"),
        ("data short of the shape", fwd(x=f32(pb2, 4, shape=[5])), INVALID, "INVALID_TENSOR"),
        ("data beyond the shape", fwd(x=f32(pb2, 4, shape=[3])), INVALID, "INVALID_TENSOR"),
        ("data not a multiple of the item size", fwd(x=f32(pb2, 1, data=b"\0" * 5)), INVALID, "INVALID_TENSOR"),
        ("session id with bad characters", fwd(session_id="a b", x=f32(pb2)), INVALID, "INVALID_ID"),
        ("session id too long", fwd(session_id="s" * 129, x=f32(pb2)), INVALID, "INVALID_ID"),
        ("layer id empty", fwd(layer_id="", x=f32(pb2)), INVALID, "INVALID_ID"),
        ("unknown session", fwd(session_id="nope", x=f32(pb2)), NOT_FOUND, "SESSION_NOT_FOUND"),
        ("unknown layer", fwd(layer_id="nope", x=f32(pb2)), NOT_FOUND, "LAYER_NOT_FOUND"),
        ("unknown kind", lambda: stub.CreateLayer(pb2.CreateLayerRequest(session_id="bad", layer_id="k", kind="tanh")),
         INVALID, "UNKNOWN_KIND"),
        ("session exists", lambda: stub.CreateSession(pb2.CreateSessionRequest(session_id="bad")), EXISTS, "SESSION_EXISTS"),
        ("backward before forward", bwd("fresh", f32(pb2)), FAILED, "NOTHING_KEPT"),
        ("dout of another shape", bwd("r", f32(pb2, 3)), INVALID, "DOUT_MISMATCH"),
        ("dout of another dtype", bwd("r", pb2.Tensor(dtype=pb2.DTYPE_FLOAT64, shape=[4], data=b"\0" * 32)),
         INVALID, "DOUT_MISMATCH"),
        ("routing header of another session",
         lambda: stub.Forward(pb2.ForwardRequest(session_id="bad", layer_id="r", x=f32(pb2)),
                              metadata=(("x-session-id", "other"),)), INVALID, "SESSION_HEADER_MISMATCH"),
        ("message over --max-message-bytes", fwd(x=f32(pb2, 300_000)), EXHAUSTED, "LIMIT_EXCEEDED"),
        ("Run step with neither forward nor backward",
         lambda: list(stub.Run(iter([pb2.RunRequest()]))), INVALID, "MISSING_STEP"),
        ("KServe: unknown model", infer(model="tanh"), NOT_FOUND, "MODEL_NOT_FOUND"),
        ("KServe: a trainable kind (not a model)", infer(model="affine"), NOT_FOUND, "MODEL_NOT_FOUND"),
        ("KServe: unknown version", lambda: kstub.ModelInfer(kpb.ModelInferRequest(model_name="relu", model_version="7")),
         NOT_FOUND, "MODEL_NOT_FOUND"),
        ("KServe: no input", lambda: kstub.ModelInfer(kpb.ModelInferRequest(model_name="relu")), INVALID, "INVALID_INPUTS"),
        ("KServe: input of another name", infer(name="dout"), INVALID, "INVALID_INPUTS"),
        ("KServe: datatype not FP32/FP64", infer(datatype="INT32"), INVALID, "INVALID_TENSOR"),
        ("KServe: negative dimension", infer(shape=(-4,)), INVALID, "INVALID_TENSOR"),
        ("KServe: raw bytes short of the shape", infer(raw=(b"\0" * 15,)), INVALID, "INVALID_TENSOR"),
        ("KServe: two raw buffers for one input", infer(raw=(b"\0" * 16, b"\0" * 16)), INVALID, "INVALID_INPUTS"),
        ("KServe: typed contents of another type",
         infer(raw=(), contents=kpb.InferTensorContents(int_contents=[1, 2, 3, 4])), INVALID, "INVALID_TENSOR"),
        ("KServe: typed contents short of the shape",
         infer(raw=(), contents=kpb.InferTensorContents(fp32_contents=[1, 2, 3])), INVALID, "INVALID_TENSOR"),
        ("KServe: sequence_id of type bool", infer(params={"sequence_id": ("bool_param", True)}), INVALID,
         "INVALID_PARAMETER"),
        ("KServe: sequence_start without an id", infer(params={"sequence_start": ("bool_param", True)}), INVALID,
         "SEQUENCE_ID_MISSING"),
        ("KServe: backward without a sequence", infer(model="relu_backward", name="dout"), FAILED, "SEQUENCE_REQUIRED"),
        ("KServe: backward before forward in a sequence",
         infer(model="relu_backward", name="dout", params={"sequence_id": ("uint64_param", 5),
                                                          "sequence_start": ("bool_param", True)}),
         FAILED, "NOTHING_KEPT"),
        ("KServe: sequence never started", infer(params={"sequence_id": ("uint64_param", 6)}), NOT_FOUND,
         "SESSION_NOT_FOUND"),
        ("KServe: a sequence on a stateless model",
         infer(model="relu_no_grad", params={"sequence_id": ("uint64_param", 7)}), INVALID, "STATELESS_MODEL"),
        ("KServe: message over --max-message-bytes", infer(shape=(300_000,), raw=(b"\0" * 1_200_000,)), EXHAUSTED,
         "LIMIT_EXCEEDED"),
    ]


def test_every_defect_class_gets_its_code_and_nothing_panics(target):
    pb2, stub, kstub, server = target
    table = [row + (None,) for row in cases(pb2, stub, kstub)] + training_cases(pb2, stub)
    for name, call, code, reason, field in table:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        got_code, got_reason, message = details(caught.value)
        assert (got_code, got_reason) == (code, reason), f"{name}: {got_code} {got_reason}: {message}"
        if field is not None:
            assert field in message, f"{name}: {field!r} not named in {message!r}"
    # Still serving, the session intact, and no panic in the log.
    y = stub.Forward(pb2.ForwardRequest(session_id="bad", layer_id="r", x=f32(pb2))).y
    assert np.frombuffer(y.data, "<f4").tolist() == [0.0, 0.0, 1.0, 2.0]
    panics = [line for line in server.log if "panic" in line.lower()]
    assert not panics, panics
    print(f"\n{len(table)} classes, {len(panics)} panics")


def test_unknown_fields_and_gzip_are_accepted(target):
    pb2, stub, _, _ = target
    request = pb2.ForwardRequest(session_id="bad", layer_id="r", x=f32(pb2), no_grad=True)
    # Field 99 (varint 1) is unknown to layerd: proto3 parsers skip it.
    raw = request.SerializeToString() + bytes([0x98, 0x06, 0x01])  # tag (99 << 3 | 0) as a varint, value 1
    channel = target[3].channel()
    call = channel.unary_unary("/layerd.v1.LayerService/Forward", request_serializer=None,
                               response_deserializer=pb2.ForwardResponse.FromString)
    assert np.frombuffer(call(raw).y.data, "<f4").tolist() == [0.0, 0.0, 1.0, 2.0]
    y = stub.Forward(request, compression=grpc.Compression.Gzip).y
    assert np.frombuffer(y.data, "<f4").tolist() == [0.0, 0.0, 1.0, 2.0]
    channel.close()

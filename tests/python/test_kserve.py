"""The KServe v2 / Triton protocol, through tritonclient's own gRPC client.

Wire compatibility (our proto against the descriptors compiled into
tritonclient), metadata and configuration, stateless Forward against numpy,
sequences (start, Forward, Backward, end) bit-identical to the native API,
errors with their codes, ModelStreamInfer and statistics.
"""
import queue
import tempfile
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from layerd_server import REPO
from reference import Relu, Sigmoid
from test_numpy_conformance import from_tensor, sample, to_tensor

KINDS = ["identity", "relu", "sigmoid"]
MODELS = KINDS + [f"{k}_backward" for k in KINDS] + [f"{k}_no_grad" for k in KINDS]
KSERVE_TYPE = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}


@pytest.fixture(scope="module")
def client(server):
    c = tc.InferenceServerClient(server.addr)
    yield c
    c.close()


@pytest.fixture(scope="module")
def raw_stub(server):
    """tritonclient's generated stub, for requests its high-level client cannot build."""
    with server.channel() as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


def infer_input(name, a):
    i = tc.InferInput(name, list(a.shape), KSERVE_TYPE[a.dtype])
    i.set_data_from_numpy(a)
    return i


def infer(client, model, a, **kw):
    name, out = ("dout", "dx") if model.endswith("_backward") else ("x", "y")
    return client.infer(model, [infer_input(name, a)], **kw).as_numpy(out)


def status_of(call):
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


# --- wire compatibility -------------------------------------------------------------------------

def our_descriptors():
    """Our inference protos as a FileDescriptorSet (not imported: tritonclient owns those names)."""
    from grpc_tools import protoc
    import grpc_tools
    out = Path(tempfile.mkdtemp(prefix="layerd-kserve-")) / "set.pb"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{REPO / 'proto'}", f"-I{well_known}", "--include_imports",
                      f"--descriptor_set_out={out}", "inference/grpc_service.proto"])
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return [f for f in fds.file if f.package == "inference"]


def theirs():
    from tritonclient.grpc import model_config_pb2
    files = []
    for module in (tpb, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def index(files):
    """Full name -> message, enum or service descriptor proto."""
    out = {}

    def walk(prefix, messages, enums):
        for e in enums:
            out[f"{prefix}.{e.name}"] = e
        for m in messages:
            out[f"{prefix}.{m.name}"] = m
            walk(f"{prefix}.{m.name}", m.nested_type, m.enum_type)

    for f in files:
        walk(f".{f.package}", f.message_type, f.enum_type)
        for s in f.service:
            out[f".{f.package}.{s.name}"] = s
    return out


def test_every_field_and_rpc_matches_tritonclients_descriptors():
    ours, triton = index(our_descriptors()), index(theirs())
    checked = 0
    for name, d in ours.items():
        assert name in triton, f"{name} is not in Triton's protocol"
        t = triton[name]
        if isinstance(d, descriptor_pb2.DescriptorProto):
            fields = {f.name: f for f in t.field}
            for f in d.field:
                assert f.name in fields, f"{name}.{f.name} is not Triton's"
                g = fields[f.name]
                assert (f.number, f.type, f.label, f.type_name) == (g.number, g.type, g.label, g.type_name), \
                    f"{name}.{f.name}: ours {f} theirs {g}"
                assert f.HasField("oneof_index") == g.HasField("oneof_index"), f"{name}.{f.name} oneof"
                checked += 1
        elif isinstance(d, descriptor_pb2.EnumDescriptorProto):
            assert [(v.name, v.number) for v in d.value] == [(v.name, v.number) for v in t.value], name
        else:
            methods = {m.name: m for m in t.method}
            for m in d.method:
                g = methods[m.name]
                assert (m.input_type, m.output_type, m.client_streaming, m.server_streaming) == \
                    (g.input_type, g.output_type, g.client_streaming, g.server_streaming), m.name
                checked += 1
    assert ".inference.InferParameter" in ours and checked > 80, checked


# --- metadata -----------------------------------------------------------------------------------

def test_server_metadata_and_readiness(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "layerd" and {"sequence", "statistics", "model_configuration"} <= set(meta.extensions)
    for model in MODELS:
        assert client.is_model_ready(model) and client.is_model_ready(model, "1")
    assert not client.is_model_ready("tanh") and not client.is_model_ready("relu", "2")
    index = client.get_model_repository_index().models
    assert sorted((m.name, m.version, m.state) for m in index) == sorted((m, "1", "READY") for m in MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_and_config_agree(client, model):
    inp, out = ("dout", "dx") if model.endswith("_backward") else ("x", "y")
    meta = client.get_model_metadata(model)
    assert (meta.name, list(meta.versions), meta.platform) == (model, ["1"], "layerd")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [(inp, "FP32", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [(out, "FP32", [-1])]
    config = client.get_model_config(model).config
    assert config.name == model and config.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in config.input] == [(inp, [-1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [(out, [-1])]
    if model.endswith("_no_grad"):
        assert config.WhichOneof("scheduling_choice") is None, "a plain stateless model"
    else:
        assert config.WhichOneof("scheduling_choice") == "sequence_batching"
        assert config.sequence_batching.max_sequence_idle_microseconds > 0


# --- stateless Forward --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 4), (1 << 20,)])
def test_stateless_forward_matches_numpy(client, dtype, shape):
    x = sample(shape, dtype, seed=zlib.crc32(repr((shape, str(dtype))).encode()) % 1000)
    y = infer(client, "relu", x)
    assert y.dtype == dtype and y.shape == shape
    assert y.tobytes() == Relu().forward(x).tobytes(), "ReLU is bit-identical to numpy"
    assert infer(client, "relu_no_grad", x).tobytes() == y.tobytes()
    assert infer(client, "identity", x).tobytes() == x.tobytes()
    s = infer(client, "sigmoid", x)
    with np.errstate(over="ignore"):
        want = Sigmoid().forward(x)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    close = np.isclose(s, want, rtol=tol, atol=0) | (np.isnan(s) & np.isnan(want))
    assert close.all() and s.dtype == dtype and s.shape == shape


def test_gzip_requests_answer_as_plain_ones(client):
    """Plain requests take ModelInfer's own message path (kserve::wire), compressed ones tonic's
    codec: the answers are the same bytes."""
    x = sample((1 << 18,), np.float32, seed=5)
    plain = infer(client, "relu_no_grad", x)
    zipped = infer(client, "relu_no_grad", x, compression_algorithm="gzip")
    assert plain.tobytes() == zipped.tobytes() == Relu().forward(x).tobytes()


def test_typed_contents_are_accepted_and_answered_raw(raw_stub):
    x = np.array([1.5, -2.0, 0.0, 3.25], np.float32)
    for datatype, contents, dtype in [("FP32", tpb.InferTensorContents(fp32_contents=x), np.float32),
                                      ("FP64", tpb.InferTensorContents(fp64_contents=x), np.float64)]:
        request = tpb.ModelInferRequest(model_name="relu", id="typed", inputs=[
            tpb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[2, 2], contents=contents)])
        response = raw_stub.ModelInfer(request)
        assert response.id == "typed" and response.outputs[0].name == "y"
        assert list(response.outputs[0].shape) == [2, 2] and response.outputs[0].datatype == datatype
        y = np.frombuffer(response.raw_output_contents[0], dtype=dtype)
        assert y.tolist() == [1.5, 0.0, 0.0, 3.25]


# --- sequences ----------------------------------------------------------------------------------

def native_train(pb, stub, kind, x, dout):
    """Forward then Backward through the native API: the numbers a sequence must reproduce."""
    pb2, _ = pb
    sid = stub.CreateSession(pb2.CreateSessionRequest()).session_id
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="l", kind=kind))
    y = stub.Forward(pb2.ForwardRequest(session_id=sid, layer_id="l", x=to_tensor(pb2, x))).y
    dx = stub.Backward(pb2.BackwardRequest(session_id=sid, layer_id="l", dout=to_tensor(pb2, dout))).dx
    stub.CloseSession(pb2.CloseSessionRequest(session_id=sid))
    return from_tensor(pb2, y), from_tensor(pb2, dx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["relu", "sigmoid", "identity"])
def test_a_sequence_trains_exactly_like_the_native_api(client, pb, stub, kind, dtype):
    x, dout = sample((3, 1000), dtype, seed=1), sample((3, 1000), dtype, seed=2)
    seq = 1000 + ["relu", "sigmoid", "identity"].index(kind) * 2 + (dtype == np.float64)
    y = infer(client, kind, x, sequence_id=seq, sequence_start=True)
    dx = infer(client, f"{kind}_backward", dout, sequence_id=seq, sequence_end=True)
    want_y, want_dx = native_train(pb, stub, kind, x, dout)
    assert y.tobytes() == want_y.tobytes() and dx.tobytes() == want_dx.tobytes()
    if kind == "relu":
        layer = Relu()
        layer.forward(x)
        assert dx.tobytes() == layer.backward(dout).tobytes(), "and bit-identical to numpy"
    # sequence_end closed the session.
    code, message = status_of(lambda: infer(client, f"{kind}_backward", dout, sequence_id=seq))
    assert code == "StatusCode.NOT_FOUND", message


def test_sequence_ids_cover_uint64_int64_and_strings(client, raw_stub):
    def request(model, name, a, **params):
        r = tpb.ModelInferRequest(model_name=model, inputs=[
            tpb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=list(a.shape))],
            raw_input_contents=[a.tobytes()])
        for key, value in params.items():
            p = r.parameters[key]
            if isinstance(value, bool):
                p.bool_param = value
            elif isinstance(value, str):
                p.string_param = value
            elif value > 2**63 - 1:
                p.uint64_param = value
            else:
                p.int64_param = value
        return r

    x, dout = np.array([-1.0, 2.0], np.float32), np.array([5.0, 7.0], np.float32)
    for seq in [2**64 - 1, 2**63, "train-7", "7"]:
        raw_stub.ModelInfer(request("relu", "x", x, sequence_id=seq, sequence_start=True))
        dx = raw_stub.ModelInfer(request("relu_backward", "dout", dout, sequence_id=seq, sequence_end=True))
        assert np.frombuffer(dx.raw_output_contents[0], np.float32).tolist() == [0.0, 7.0], seq
    # int64 -1 is uint64 2^64-1, as in Triton.
    raw_stub.ModelInfer(request("relu", "x", x, sequence_id=2**64 - 1, sequence_start=True))
    infer(client, "relu_backward", dout, sequence_id=-1, sequence_end=True)


def test_layer_id_keeps_several_instances_in_one_sequence(client):
    a, b = np.array([-1.0, 2.0], np.float32), np.array([3.0, -4.0], np.float32)
    infer(client, "relu", a, sequence_id=77, sequence_start=True, parameters={"layer_id": "first"})
    infer(client, "relu", b, sequence_id=77, parameters={"layer_id": "second"})
    ones = np.ones(2, np.float32)
    assert infer(client, "relu_backward", ones, sequence_id=77, parameters={"layer_id": "first"}).tolist() == [0, 1]
    assert infer(client, "relu_backward", ones, sequence_id=77, parameters={"layer_id": "second"}).tolist() == [1, 0]
    code, message = status_of(lambda: infer(client, "sigmoid", a, sequence_id=77, parameters={"layer_id": "first"}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "relu" in message
    infer(client, "relu", a, sequence_id=77, sequence_end=True)


def test_starting_a_live_sequence_is_already_exists_and_leaves_it_untouched(client):
    infer(client, "relu", np.array([-1.0, 1.0], np.float32), sequence_id=88, sequence_start=True)
    code, message = status_of(lambda: infer(client, "relu", np.array([1.0, -1.0], np.float32),
                                            sequence_id=88, sequence_start=True))
    assert code == "StatusCode.ALREADY_EXISTS", message
    dx = infer(client, "relu_backward", np.ones(2, np.float32), sequence_id=88, sequence_end=True)
    assert dx.tolist() == [0.0, 1.0], "the first Forward's mask is still the one kept"


# --- errors -------------------------------------------------------------------------------------

def test_errors_carry_their_codes(client, raw_stub):
    x = np.array([1.0, -1.0], np.float32)
    wrong = tc.InferInput("x", [2], "INT32")
    wrong.set_data_from_numpy(np.array([1, 2], np.int32))
    code, message = status_of(lambda: client.infer("relu", [wrong]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "inputs[0].datatype" in message and "INT32" in message

    short = tpb.ModelInferRequest(model_name="relu", inputs=[
        tpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[4])],
        raw_input_contents=[x.tobytes()])
    with pytest.raises(grpc.RpcError) as caught:
        raw_stub.ModelInfer(short)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents[0]" in caught.value.details() and "16 bytes" in caught.value.details()

    code, message = status_of(lambda: infer(client, "tanh", x))
    assert code == "StatusCode.NOT_FOUND" and "tanh" in message
    code, message = status_of(lambda: client.infer("relu", [infer_input("dout", x)]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "inputs[0].name" in message
    code, message = status_of(lambda: infer(client, "relu_backward", x))
    assert code == "StatusCode.FAILED_PRECONDITION" and "sequence" in message
    code, message = status_of(lambda: infer(client, "relu_no_grad", x, sequence_id=3, sequence_start=True))
    assert code == "StatusCode.INVALID_ARGUMENT" and "stateless" in message
    code, message = status_of(lambda: infer(client, "relu_backward", x, sequence_id=99, sequence_start=True))
    assert code == "StatusCode.FAILED_PRECONDITION", message
    # ... and that failed start left no session behind.
    code, message = status_of(lambda: infer(client, "relu", x, sequence_id=99))
    assert code == "StatusCode.NOT_FOUND", message
    code, message = status_of(lambda: infer(client, "relu", x, sequence_id=5, headers={"x-session-id": "6"}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "x-session-id" in message
    infer(client, "relu", x, sequence_id=5, sequence_start=True, sequence_end=True,
          headers={"x-session-id": "5"})


# --- streaming ----------------------------------------------------------------------------------

def stream_answers(client, requests, headers=None):
    """Sends (model, array, kwargs) requests on one stream; returns the callbacks' (result, error)."""
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    try:
        for i, (model, a, kw) in enumerate(requests):
            name = "dout" if model.endswith("_backward") else "x"
            client.async_stream_infer(model, [infer_input(name, a)], request_id=str(i), **kw)
        got = [answers.get(timeout=30) for _ in requests]
    finally:
        client.stop_stream()
    return got


def test_stream_infer_answers_in_order_and_reports_errors_in_band(client):
    x = np.array([-2.0, 3.0], np.float32)
    got = stream_answers(client, [
        ("relu", x, dict(sequence_id=300, sequence_start=True)),
        ("tanh", x, {}),
        ("relu_backward", np.ones(2, np.float32), dict(sequence_id=300, sequence_end=True)),
        ("sigmoid", x, {}),
    ])
    (r0, e0), (r1, e1), (r2, e2), (r3, e3) = got
    assert e0 is None and r0.as_numpy("y").tolist() == [0.0, 3.0] and r0.get_response().id == "0"
    assert r1 is None and "tanh" in e1.message()
    assert e2 is None and r2.as_numpy("dx").tolist() == [0.0, 1.0]
    assert e3 is None and np.allclose(r3.as_numpy("y"), 1 / (1 + np.exp(-x)))


def test_stream_errors_become_a_status_with_triton_grpc_error(client):
    x = np.array([1.0], np.float32)
    got = stream_answers(client, [("relu", x, {}), ("tanh", x, {})], headers={"triton_grpc_error": "true"})
    assert got[0][1] is None
    assert got[1][0] is None and "NOT_FOUND" in got[1][1].status()


# --- statistics ---------------------------------------------------------------------------------

def test_statistics_count_real_requests(client):
    before = client.get_inference_statistics("sigmoid").model_stats[0]
    x = np.ones(100, np.float32)
    for _ in range(5):
        infer(client, "sigmoid", x)
    status_of(lambda: client.infer("sigmoid", [infer_input("wrong", x)]))
    after = client.get_inference_statistics("sigmoid").model_stats[0]
    s, b = after.inference_stats, before.inference_stats
    assert after.inference_count - before.inference_count == 5
    assert s.success.count - b.success.count == 5 and s.success.ns > b.success.ns
    assert s.fail.count - b.fail.count == 1
    assert s.compute_infer.count - b.compute_infer.count == 5 and s.compute_infer.ns > b.compute_infer.ns
    assert after.last_inference >= before.last_inference > 0
    assert len(client.get_inference_statistics().model_stats) == len(MODELS)

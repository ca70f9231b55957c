"""ExportSession / ImportSession: the file is a safetensors file with the contract's names;
training k steps, exporting, importing into a new session on another server process and
training on gives parameters bit-identical to training straight through (dropout generators,
batch-norm running statistics, Adam's state and step count included); a bad file is
INVALID_ARGUMENT and creates no session."""
import json
import struct
import uuid

import grpc
import numpy as np
import pytest
import safetensors.numpy

from layerd_server import Server
from test_training_layers import bits_equal, from_tensor, to_tensor
from test_training_step import code_and_reason, params_of

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def convnet(pb2):
    member = lambda name, kind, **c: pb2.LayerSpec(name=name, kind=kind, config=pb2.LayerConfig(**c))  # noqa: E731
    return pb2.LayerConfig(sequential=pb2.SequentialConfig(layers=[
        member("conv", "convolution", convolution=pb2.ConvolutionConfig(
            in_channels=1, out_channels=4, kernel_h=3, kernel_w=3, pad=1, init=pb2.Init(seed=3))),
        member("bn", "batch_norm", batch_norm=pb2.BatchNormConfig(num_features=4)),
        member("relu", "relu"),
        member("pool", "pooling", pooling=pb2.PoolingConfig(pool_h=2, pool_w=2)),
        member("fc1", "affine", affine=pb2.AffineConfig(in_features=4 * 4 * 4, out_features=16,
                                                         init=pb2.Init(seed=4))),
        member("drop", "dropout", dropout=pb2.DropoutConfig(ratio=0.3, seed=11)),
        member("fc2", "affine", affine=pb2.AffineConfig(in_features=16, out_features=5, init=pb2.Init(seed=5))),
        member("loss", "softmax_with_loss")]))


def build(pb2, stub, dtype=None):
    """A session with the convnet (Adam) and a plain affine head (Momentum)."""
    sid = stub.CreateSession(pb2.CreateSessionRequest(session_id=uuid.uuid4().hex)).session_id
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="net", kind="sequential", config=convnet(pb2),
                                            dtype=dtype or pb2.DTYPE_FLOAT64))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="head", kind="affine", dtype=dtype or pb2.DTYPE_FLOAT64,
                                            config=pb2.LayerConfig(affine=pb2.AffineConfig(in_features=3, out_features=2, init=pb2.Init(seed=6)))))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="act", kind="sigmoid"))
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="adam", layer_ids=["net"],
                                                    adam=pb2.Adam(lr=0.01)))
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="mom", layer_ids=["head"],
                                                    momentum=pb2.Momentum(lr=0.1)))
    return sid


def batches(dtype, steps):
    r = np.random.default_rng(21)
    return [(r.standard_normal((6, 1, 8, 8)).astype(dtype), r.integers(0, 5, 6).astype(np.int64),
             r.standard_normal((4, 3)).astype(dtype), r.standard_normal((4, 2)).astype(dtype)) for _ in range(steps)]


def train(pb2, stub, sid, data):
    losses = []
    for x, t, hx, hd in data:
        losses.append(stub.TrainStep(pb2.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="adam",
                                                          x=to_tensor(pb2, x), t=to_tensor(pb2, t))).loss)
        stub.Forward(pb2.ForwardRequest(session_id=sid, layer_id="head", x=to_tensor(pb2, hx)))
        stub.Backward(pb2.BackwardRequest(session_id=sid, layer_id="head", dout=to_tensor(pb2, hd)))
        stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="mom"))
    return losses


def export(pb2, stub, sid):
    return stub.ExportSession(pb2.ExportSessionRequest(session_id=sid)).safetensors


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_export_import_on_another_server_continues_bit_identically(pb, dtype):
    pb2, pb2_grpc = pb
    np_dtype, wire = {"f32": (np.float32, pb2.DTYPE_FLOAT32), "f64": (np.float64, pb2.DTYPE_FLOAT64)}[dtype]
    k, more = 4, 5
    data = batches(np_dtype, k + more)
    first, second = Server(), Server()
    try:
        with first.channel() as a, second.channel() as b:
            one, two = pb2_grpc.LayerServiceStub(a), pb2_grpc.LayerServiceStub(b)
            straight = build(pb2, one, wire)
            straight_losses = train(pb2, one, straight, data)

            resumed = build(pb2, one, wire)
            train(pb2, one, resumed, data[:k])
            file = export(pb2, one, resumed)
            # The contract's names, readable with safetensors.numpy.
            tensors = safetensors.numpy.load(file)
            assert {"layers.net.conv.W", "layers.net.bn.running_var", "layers.head.W",
                    "optimizers.adam.m.net.fc1.W", "optimizers.adam.v.net.bn.gamma",
                    "optimizers.mom.v.head.b"} <= set(tensors), sorted(tensors)
            assert not any(name.startswith("layers.act") for name in tensors)
            params, buffers, _ = params_of(pb2, one, resumed, "net")
            bits_equal(tensors["layers.net.fc2.W"], params["fc2.W"], "exported W")
            bits_equal(tensors["layers.net.bn.running_mean"], buffers["bn.running_mean"], "exported buffer")
            assert tensors["layers.net.fc2.W"].dtype == np_dtype
            size = struct.unpack("<Q", file[:8])[0]
            manifest = json.loads(json.loads(file[8:8 + size])["__metadata__"]["layerd"])
            assert [o["steps"] for o in manifest["optimizers"]] == [k, k]
            assert [layer["id"] for layer in manifest["layers"]] == ["act", "head", "net"]

            answer = two.ImportSession(pb2.ImportSessionRequest(safetensors=file, idle_timeout_seconds=60))
            assert answer.idle_timeout_seconds == 60 and len(answer.session_id) == 32
            moved = answer.session_id
            # The imported session exports the same file.
            assert export(pb2, two, moved) == file
            resumed_losses = train(pb2, two, moved, data[k:])
            assert resumed_losses == straight_losses[k:], (resumed_losses, straight_losses[k:])
            for layer in ("net", "head"):
                want, want_buffers, _ = params_of(pb2, one, straight, layer)
                got, got_buffers, _ = params_of(pb2, two, moved, layer)
                for name in want:
                    bits_equal(got[name], want[name], f"{layer}.{name}")
                for name in want_buffers:
                    bits_equal(got_buffers[name], want_buffers[name], f"{layer}.{name}")
            # The optimizer's step count went on from k.
            assert two.Step(pb2.StepRequest(session_id=moved, optimizer_id="mom")).steps == k + more + 1
    finally:
        first.stop()
        second.stop()


def test_a_bad_file_is_invalid_argument_and_creates_no_session(pb, server):
    pb2, pb2_grpc = pb
    with server.channel() as channel:
        stub = pb2_grpc.LayerServiceStub(channel)
        sid = build(pb2, stub)
        train(pb2, stub, sid, batches(np.float64, 1))
        good = export(pb2, stub, sid)
        size = struct.unpack("<Q", good[:8])[0]
        header = json.loads(good[8:8 + size])
        body = good[8 + size:]

        def rewrite(change_header=None, change_manifest=None, body=body):
            h = json.loads(json.dumps(header))
            m = json.loads(h["__metadata__"]["layerd"])
            if change_manifest:
                change_manifest(m)
            h["__metadata__"]["layerd"] = json.dumps(m)
            if change_header:
                change_header(h)
            text = json.dumps(h).encode()
            text += b" " * (-len(text) % 8)
            return struct.pack("<Q", len(text)) + text + body

        def shift(h):  # remove a tensor and its bytes consistently
            name = "optimizers.mom.v.head.b"
            start, end = h.pop(name)["data_offsets"]
            for info in h.values():
                if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
                    info["data_offsets"] = [offset - (end - start) for offset in info["data_offsets"]]

        mom_start, mom_end = header["optimizers.mom.v.head.b"]["data_offsets"]
        without_mom = body[:mom_start] + body[mom_end:]

        def set_layer(key, value, index=2):
            return lambda m: m["layers"][index].__setitem__(key, value)

        cases = {
            "empty": (b"", "safetensors"),
            "truncated": (good[:-5], "safetensors"),
            "huge header length": (struct.pack("<Q", 1 << 62) + good[8:], "safetensors"),
            "not a manifest": (rewrite(lambda h: h["__metadata__"].__setitem__("layerd", "{")), "__metadata__.layerd"),
            "no manifest": (rewrite(lambda h: h.pop("__metadata__")), "__metadata__.layerd"),
            "foreign format": (rewrite(change_manifest=lambda m: m.__setitem__("format", "other")), "format"),
            "unknown field": (rewrite(change_manifest=set_layer("colour", "red")), "__metadata__.layerd"),
            "unknown kind": (rewrite(change_manifest=set_layer("kind", "tanh")), "layers[2].kind"),
            "bad config": (rewrite(change_manifest=lambda m: m["layers"][2]["config"]["sequential"]["layers"][0]["config"]["convolution"].__setitem__("kernel_h", 0)),
                           "layers[2].config.sequential.layers[0].config.convolution.kernel_h"),
            "config changes a shape": (rewrite(change_manifest=lambda m: m["layers"][1]["config"]["affine"].__setitem__("out_features", 3)),
                                       'safetensors["layers.head.W"]'),
            "bad id": (rewrite(change_manifest=set_layer("id", "a b")), "layers[2].id"),
            "duplicate id": (rewrite(change_manifest=set_layer("id", "head")), "layers[2].id"),
            "bad generator": (rewrite(change_manifest=lambda m: m["layers"][2]["generators"].__setitem__("drop", "0" * 64)),
                              'generators["drop"]'),
            "missing generator": (rewrite(change_manifest=lambda m: m["layers"][2].__setitem__("generators", {})),
                                  'generators["drop"]'),
            "missing tensor": (rewrite(shift, body=without_mom), 'safetensors["optimizers.mom.v.head.b"]'),
            "extra tensor": (rewrite(change_manifest=lambda m: m["optimizers"].pop()), '"optimizers.mom.v.head.W"'),
            "wrong dtype": (rewrite(lambda h: h["layers.head.b"].__setitem__("dtype", "I64")), 'safetensors["layers.head.b"]'),
            "bad algorithm": (rewrite(change_manifest=lambda m: m["optimizers"][0]["algorithm"]["adam"].__setitem__("beta2", 1.5)),
                              "optimizers[0].adam.beta2"),
            "owned twice": (rewrite(change_manifest=lambda m: m["optimizers"][1].__setitem__("layer_ids", ["net"])),
                            "optimizers[1].layer_ids[0]"),
            "unknown layer": (rewrite(change_manifest=lambda m: m["optimizers"][1].__setitem__("layer_ids", ["zzz"])),
                              "optimizers[1].layer_ids[0]"),
        }
        for name, (file, field) in cases.items():
            wanted = uuid.uuid4().hex
            with pytest.raises(grpc.RpcError) as caught:
                stub.ImportSession(pb2.ImportSessionRequest(session_id=wanted, safetensors=file))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, caught.value.details())
            assert field in caught.value.details(), (name, field, caught.value.details())
            # No session was left behind under the requested id.
            with pytest.raises(grpc.RpcError) as gone:
                stub.ExportSession(pb2.ExportSessionRequest(session_id=wanted))
            assert code_and_reason(gone.value) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"), name
        # The unmodified file (rewritten through the same path) imports.
        assert stub.ImportSession(pb2.ImportSessionRequest(safetensors=rewrite())).session_id


def test_an_import_over_the_budget_is_refused_whole(pb):
    pb2, pb2_grpc = pb
    # An affine 50 × 50 in float64 holds 39.8 KiB (W, b and their gradients), its Adam 2 × 19.9 KiB
    # more: 79.7 KiB a session. Two such sessions exceed the server's 150 KiB.
    small = Server("--max-total-kept-bytes", "150KiB")
    try:
        with small.channel() as channel:
            stub = pb2_grpc.LayerServiceStub(channel)
            stub.CreateSession(pb2.CreateSessionRequest(session_id="first"))
            stub.CreateLayer(pb2.CreateLayerRequest(
                session_id="first", layer_id="fc", kind="affine", dtype=pb2.DTYPE_FLOAT64,
                config=pb2.LayerConfig(affine=pb2.AffineConfig(in_features=50, out_features=50))))
            stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id="first", optimizer_id="o", adam=pb2.Adam()))
            file = export(pb2, stub, "first")
            with pytest.raises(grpc.RpcError) as caught:
                stub.ImportSession(pb2.ImportSessionRequest(session_id="copy", safetensors=file))
            assert code_and_reason(caught.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")
            assert "--max-total-kept-bytes" in caught.value.details()
            # Nothing of it stayed: no session, and its layer's bytes were released, so once the
            # first session is gone the same file imports.
            with pytest.raises(grpc.RpcError) as gone:
                stub.ExportSession(pb2.ExportSessionRequest(session_id="copy"))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            stub.CloseSession(pb2.CloseSessionRequest(session_id="first"))
            assert stub.ImportSession(pb2.ImportSessionRequest(session_id="copy", safetensors=file)).session_id == "copy"
            assert export(pb2, stub, "copy") == file
    finally:
        small.stop()

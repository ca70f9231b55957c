#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpus: valid and near-valid requests of each kind, as wire
bytes (layer_request: a CreateLayerRequest's length as two little-endian bytes, the request, then
a RunRequest; kserve_request: a selector byte — which also sets the frames the message is cut into —
then a ModelInferRequest).

    .venv/bin/python fuzz/seed_corpus.py
"""
import hashlib
import struct
import sys
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as kpb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "python"))
from conftest import compile_proto  # noqa: E402


def write(target, data):
    out = HERE / "corpus" / target / f"seed-{hashlib.sha1(data).hexdigest()[:16]}"
    out.write_bytes(data)


def layer_input(create, run):
    c = create.SerializeToString()
    return struct.pack("<H", len(c)) + c + run.SerializeToString()


def layers(pb2):
    """A CreateLayerRequest of every kind (and a few near-valid ones)."""
    cfg = pb2.LayerConfig
    conv = pb2.ConvolutionConfig(in_channels=2, out_channels=3, kernel_h=2, kernel_w=2, stride=1, pad=1,
                                 init=pb2.Init(method=pb2.Init.XAVIER, seed=3))
    members = [pb2.LayerSpec(name="c", kind="convolution", config=cfg(convolution=conv)),
               pb2.LayerSpec(name="r", kind="relu"),
               pb2.LayerSpec(name="p", kind="pooling", config=cfg(pooling=pb2.PoolingConfig(pool_h=2, pool_w=2))),
               pb2.LayerSpec(name="f", kind="affine", config=cfg(affine=pb2.AffineConfig(in_features=12, out_features=4))),
               pb2.LayerSpec(name="l", kind="softmax_with_loss")]
    specs = [
        ("identity", None), ("relu", None), ("sigmoid", None), ("softmax_with_loss", None),
        ("affine", cfg(affine=pb2.AffineConfig(in_features=4, out_features=3, init=pb2.Init(seed=1)))),
        ("dropout", cfg(dropout=pb2.DropoutConfig(ratio=0.25, seed=9))),
        ("batch_norm", cfg(batch_norm=pb2.BatchNormConfig(num_features=2, momentum=0.5))),
        ("convolution", cfg(convolution=conv)),
        ("pooling", cfg(pooling=pb2.PoolingConfig(pool_h=2, pool_w=1, stride=1, pad=0))),
        ("sequential", cfg(sequential=pb2.SequentialConfig(layers=members))),
        ("affine", cfg(dropout=pb2.DropoutConfig())),
        ("sequential", cfg(sequential=pb2.SequentialConfig(layers=[pb2.LayerSpec(name="s", kind="sequential")]))),
    ]
    for kind, config in specs:
        request = pb2.CreateLayerRequest(session_id="s", layer_id="l", kind=kind)
        if config is not None:
            request.config.CopyFrom(config)
        yield request
    given = pb2.CreateLayerRequest(session_id="s", layer_id="l", kind="affine", dtype=pb2.DTYPE_FLOAT64,
                                   config=cfg(affine=pb2.AffineConfig(in_features=2, out_features=1)))
    given.params["W"].CopyFrom(pb2.Tensor(dtype=pb2.DTYPE_FLOAT64, shape=[2, 1], data=np.ones(2).tobytes()))
    yield given


def main():
    pb2, _ = compile_proto()
    values = np.array([-2.5, -0.0, 0.0, 1.5, np.inf, -np.inf, np.nan, 1e-40], np.float32)
    for create in layers(pb2):
        for dtype, np_type in [(pb2.DTYPE_FLOAT32, np.float32), (pb2.DTYPE_FLOAT64, np.float64)]:
            for shape in [(), (8,), (2, 4), (3, 2), (1, 2, 2, 2), (2, 2, 3, 3), (0,), (0, 3)]:
                n = int(np.prod(shape))
                x = pb2.Tensor(dtype=dtype, shape=shape, data=np.resize(values, n).astype(np_type).tobytes())
                forward = pb2.ForwardRequest(session_id="s", layer_id="l", x=x, no_grad=n % 2 == 1, eval=n % 3 == 0)
                if shape and shape[0] in (2, 3):
                    forward.t.CopyFrom(pb2.Tensor(dtype=pb2.DTYPE_INT64, shape=[shape[0]],
                                                  data=np.arange(shape[0], dtype="<i8").tobytes()))
                write("layer_request", layer_input(create, pb2.RunRequest(forward=forward)))
                write("layer_request", layer_input(create, pb2.RunRequest(backward=pb2.BackwardRequest(
                    session_id="s-1", layer_id="relu.0", dout=x, return_grads=True))))
    write("layer_request", layer_input(pb2.CreateLayerRequest(kind="relu"), pb2.RunRequest(forward=pb2.ForwardRequest(
        session_id="bad id", x=pb2.Tensor(dtype=pb2.DTYPE_FLOAT32, shape=[3], data=b"\0" * 11)))))

    for model in ["relu", "sigmoid_backward", "identity_no_grad"]:
        for datatype, np_type in [("FP32", np.float32), ("FP64", np.float64)]:
            data = np.resize(values, 6).astype(np_type)
            request = kpb.ModelInferRequest(model_name=model, model_version="1", id="7")
            request.inputs.add(name="dout" if model.endswith("_backward") else "x", datatype=datatype, shape=[2, 3])
            request.raw_input_contents.append(data.tobytes())
            request.parameters["sequence_id"].uint64_param = 42
            request.parameters["sequence_start"].bool_param = True
            write("kserve_request", b"\x00" + request.SerializeToString())
            typed = kpb.ModelInferRequest(model_name=model)
            tensor = typed.inputs.add(name="x", datatype=datatype, shape=[6])
            (tensor.contents.fp32_contents if datatype == "FP32" else tensor.contents.fp64_contents).extend(data.tolist())
            typed.outputs.add(name="y")
            write("kserve_request", b"\xff" + typed.SerializeToString())
    wrong = kpb.ModelInferRequest(model_name="nope")
    wrong.inputs.add(name="x", datatype="INT8", shape=[-1])
    wrong.parameters["sequence_id"].string_param = "seq:7"
    write("kserve_request", b"\x80" + wrong.SerializeToString() + struct.pack("<d", 1.0))


if __name__ == "__main__":
    main()

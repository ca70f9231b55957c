#!/usr/bin/env python3
"""A KServe v2 / Triton protocol peer: grpcio + numpy, what a Python user would write.

Models (float32, any 1-D length): `relu` and `sigmoid` (stateless) and `relu_seq`
(sequence batching: each sequence keeps its last ReLU mask `x <= 0`, as layerd's `relu`
model does in a sequence). Inputs raw or typed (`fp32_contents`), outputs raw. It uses the
generated stubs that tritonclient ships, so it needs nothing outside this repository.

    python bench/peers/kserve_numpy_server.py --addr 127.0.0.1:18101 --workers 8

Needs numpy, grpcio and tritonclient[grpc] (the repo's .venv has them).
"""
import argparse
import threading

import grpc
import numpy as np
from serving import serve
from tritonclient.grpc import model_config_pb2 as mc, service_pb2 as pb, service_pb2_grpc


def relu(x):
    y = x.copy()
    mask = x <= 0
    y[mask] = 0
    return y, mask


def sigmoid(x):
    return 1 / (1 + np.exp(-x)), None


# name -> (function, stateful)
MODELS = {"relu": (relu, False), "sigmoid": (sigmoid, False), "relu_seq": (relu, True)}


def fail(context, code, message):
    context.abort(code, message)


class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self):
        self.masks, self.lock = {}, threading.Lock()

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in MODELS)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kserve-numpy-peer", version="1", extensions=["sequence"])

    def _model(self, name, context):
        if name not in MODELS:
            fail(context, grpc.StatusCode.NOT_FOUND, f"model {name!r}: expected one of {sorted(MODELS)}")
        return MODELS[name]

    def ModelMetadata(self, request, context):
        self._model(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="python",
                                        inputs=[tensor(name="x", datatype="FP32", shape=[-1])],
                                        outputs=[tensor(name="y", datatype="FP32", shape=[-1])])

    def ModelConfig(self, request, context):
        _, stateful = self._model(request.name, context)
        config = mc.ModelConfig(
            name=request.name, platform="python", max_batch_size=0,
            input=[mc.ModelInput(name="x", data_type=mc.TYPE_FP32, dims=[-1])],
            output=[mc.ModelOutput(name="y", data_type=mc.TYPE_FP32, dims=[-1])])
        if stateful:
            config.sequence_batching.max_sequence_idle_microseconds = 5_000_000
        return pb.ModelConfigResponse(config=config)

    def ModelInfer(self, request, context):
        function, stateful = self._model(request.model_name, context)
        if len(request.inputs) != 1 or request.inputs[0].name != "x":
            fail(context, grpc.StatusCode.INVALID_ARGUMENT, "inputs: expected exactly one input named x")
        spec = request.inputs[0]
        if spec.datatype != "FP32":
            fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"x: expected FP32, got {spec.datatype}")
        if request.raw_input_contents:
            x = np.frombuffer(request.raw_input_contents[0], "<f4")
        else:
            x = np.array(spec.contents.fp32_contents, np.float32)
        if x.size != int(np.prod(spec.shape)):
            fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"x: {x.size} elements for shape {list(spec.shape)}")
        with np.errstate(all="ignore"):
            y, mask = function(x.reshape(tuple(spec.shape)))
        if stateful:
            params = request.parameters
            if "sequence_id" not in params:
                fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"{request.model_name} needs a sequence_id")
            which = params["sequence_id"].WhichOneof("parameter_choice")
            sequence = getattr(params["sequence_id"], which)
            with self.lock:
                if "sequence_start" in params and params["sequence_start"].bool_param:
                    self.masks.pop(sequence, None)
                elif sequence not in self.masks:
                    fail(context, grpc.StatusCode.NOT_FOUND, f"sequence {sequence!r} not started")
                self.masks[sequence] = mask
                if "sequence_end" in params and params["sequence_end"].bool_param:
                    del self.masks[sequence]
        output = pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=y.shape)
        return pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id,
                                     outputs=[output], raw_output_contents=[y.astype("<f4").tobytes()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", default="127.0.0.1:18101")
    ap.add_argument("--workers", type=int, default=8, help="grpcio's thread pool size")
    args = ap.parse_args()
    serve(lambda server: service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Service(), server), args.addr, args.workers, "KServe numpy peer")

if __name__ == "__main__":
    main()

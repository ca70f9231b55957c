#!/usr/bin/env python3
"""The comparison peer: the layerd.v1 contract served by grpcio, with numpy doing the math.

What a Python user would build instead of layerd: the classic numpy layers — ReLU keeps the
mask `x <= 0`, Sigmoid keeps its output — held per session in dicts, behind a grpcio
server with a thread pool. It serves what the benchmarks drive (sessions with ids and idle
timeouts, layers, Forward with no_grad, Backward, Run streams, ListLayerKinds) and answers
bad requests with the same status codes as layerd, so both can be driven and verified by
layerd-bench with identical settings. It uses the Python client's generated stubs
(clients/python/src/layerd/v1), so it needs nothing outside this repository.

    python bench/peers/numpy_server.py --addr 127.0.0.1:50551 --workers 16

Needs numpy, grpcio and protobuf (the repo's .venv, or `pip install ./clients/python`).
"""
import argparse
import re
import secrets
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "src"))
from layerd.v1 import layerd_pb2 as pb, layerd_pb2_grpc  # noqa: E402
from serving import serve  # noqa: E402


class Relu:
    def __init__(self):
        self.mask = None

    def forward(self, x):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dout[self.mask] = 0
        return dout


class Sigmoid:
    def __init__(self):
        self.out = None

    def forward(self, x):
        self.out = 1 / (1 + np.exp(-x))
        return self.out

    def backward(self, dout):
        return dout * (1.0 - self.out) * self.out


class Identity:
    def forward(self, x):
        return x.copy()

    def backward(self, dout):
        return dout


KINDS = {
    "identity": (Identity, "Identity: y = x; keeps only the shape"),
    "relu": (Relu, "ReLU: y = x where x > 0, else 0; keeps the mask x <= 0"),
    "sigmoid": (Sigmoid, "Sigmoid: y = 1 / (1 + exp(-x)); keeps y"),
}
NUMPY = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT64: np.dtype("<f8")}
ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_IDLE, MAX_IDLE = 300, 3600


class Failure(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Layer:
    def __init__(self, kind):
        self.impl = KINDS[kind][0]()
        self.kept = None  # (dtype, shape) of the last keeping Forward
        self.lock = threading.Lock()


class Session:
    def __init__(self, idle):
        self.idle, self.touched, self.layers = idle, time.monotonic(), {}


def to_array(tensor, field):
    if tensor is None:
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: missing")
    if tensor.dtype not in NUMPY:
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.dtype: expected FLOAT32 or FLOAT64, got {tensor.dtype}")
    dtype, shape = NUMPY[tensor.dtype], tuple(tensor.shape)
    want = int(np.prod(shape, dtype=np.uint64)) * dtype.itemsize
    if len(tensor.data) != want:
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{field}.data: expected {want} bytes for shape {list(shape)}, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype).reshape(shape).copy()


def to_tensor(a):
    dtype = pb.DTYPE_FLOAT32 if a.dtype == np.float32 else pb.DTYPE_FLOAT64
    return pb.Tensor(dtype=dtype, shape=a.shape, data=np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes())


class Service(layerd_pb2_grpc.LayerServiceServicer):
    def __init__(self):
        self.sessions, self.lock = {}, threading.Lock()

    def _session(self, sid):
        with self.lock:
            session = self.sessions.get(sid)
            now = time.monotonic()
            if session is None or now - session.touched > session.idle:
                self.sessions.pop(sid, None)
                raise Failure(grpc.StatusCode.NOT_FOUND, f"session_id: no session {sid!r}")
            session.touched = now
            return session

    def _layer(self, sid, lid):
        layer = self._session(sid).layers.get(lid)
        if layer is None:
            raise Failure(grpc.StatusCode.NOT_FOUND, f"layer_id: no layer {lid!r} in session {sid!r}")
        return layer

    def CreateSession(self, request, context):
        sid = request.session_id or secrets.token_hex(16)
        if not ID.fullmatch(sid):
            raise Failure(grpc.StatusCode.INVALID_ARGUMENT, "session_id: expected 1-128 of [A-Za-z0-9._:-]")
        idle = min(request.idle_timeout_seconds or DEFAULT_IDLE, MAX_IDLE)
        with self.lock:
            if sid in self.sessions:
                raise Failure(grpc.StatusCode.ALREADY_EXISTS, f"session_id: {sid!r} exists")
            self.sessions[sid] = Session(idle)
        return pb.CreateSessionResponse(session_id=sid, idle_timeout_seconds=idle)

    def CloseSession(self, request, context):
        with self.lock:
            if self.sessions.pop(request.session_id, None) is None:
                raise Failure(grpc.StatusCode.NOT_FOUND, f"session_id: no session {request.session_id!r}")
        return pb.CloseSessionResponse()

    def CreateLayer(self, request, context):
        session = self._session(request.session_id)
        if request.kind not in KINDS:
            raise Failure(grpc.StatusCode.INVALID_ARGUMENT, f"kind: expected one of {sorted(KINDS)}, got {request.kind!r}")
        if not ID.fullmatch(request.layer_id):
            raise Failure(grpc.StatusCode.INVALID_ARGUMENT, "layer_id: expected 1-128 of [A-Za-z0-9._:-]")
        with self.lock:
            if request.layer_id in session.layers:
                raise Failure(grpc.StatusCode.ALREADY_EXISTS, f"layer_id: {request.layer_id!r} exists")
            session.layers[request.layer_id] = Layer(request.kind)
        return pb.CreateLayerResponse()

    def _forward(self, request):
        layer = self._layer(request.session_id, request.layer_id)
        x = to_array(request.x if request.HasField("x") else None, "x")
        with layer.lock, np.errstate(all="ignore"):
            if request.no_grad:
                y = type(layer.impl)().forward(x)
            else:
                y = layer.impl.forward(x)
                layer.kept = (x.dtype, x.shape)
        return pb.ForwardResponse(y=to_tensor(y))

    def _backward(self, request):
        layer = self._layer(request.session_id, request.layer_id)
        dout = to_array(request.dout if request.HasField("dout") else None, "dout")
        with layer.lock, np.errstate(all="ignore"):
            if layer.kept is None:
                raise Failure(grpc.StatusCode.FAILED_PRECONDITION, "Backward before a keeping Forward")
            if layer.kept != (dout.dtype, dout.shape):
                raise Failure(grpc.StatusCode.INVALID_ARGUMENT,
                              f"dout: expected {layer.kept[0]} {list(layer.kept[1])}, got {dout.dtype} {list(dout.shape)}")
            return pb.BackwardResponse(dx=to_tensor(layer.impl.backward(dout)))

    def Forward(self, request, context):
        return self._forward(request)

    def Backward(self, request, context):
        return self._backward(request)

    def Run(self, request_iterator, context):
        for step in request_iterator:
            which = step.WhichOneof("step")
            if which == "forward":
                yield pb.RunResponse(forward=self._forward(step.forward))
            elif which == "backward":
                yield pb.RunResponse(backward=self._backward(step.backward))
            else:
                raise Failure(grpc.StatusCode.INVALID_ARGUMENT, "step: neither forward nor backward")

    def ListLayerKinds(self, request, context):
        return pb.ListLayerKindsResponse(kinds=[pb.LayerKind(name=n, description=d) for n, (_, d) in sorted(KINDS.items())])


class Failures(grpc.ServerInterceptor):
    """Turns a raised Failure into its status (handlers stay plain functions)."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None

        def guard(call, streaming):
            def unary(request, context):
                try:
                    return call(request, context)
                except Failure as f:
                    context.abort(f.code, f.message)

            def stream(request, context):
                try:
                    yield from call(request, context)
                except Failure as f:
                    context.abort(f.code, f.message)

            return stream if streaming else unary

        if handler.unary_unary:
            return handler._replace(unary_unary=guard(handler.unary_unary, False))
        if handler.stream_stream:
            return handler._replace(stream_stream=guard(handler.stream_stream, True))
        return handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", default="127.0.0.1:50551")
    ap.add_argument("--workers", type=int, default=16, help="grpcio's thread pool size")
    args = ap.parse_args()
    serve(lambda server: layerd_pb2_grpc.add_LayerServiceServicer_to_server(Service(), server), args.addr, args.workers, "numpy peer", interceptors=[Failures()])

if __name__ == "__main__":
    main()

"""The numpy-friendly wrapper: Client -> Session -> Layer."""
from __future__ import annotations

import functools
import secrets
from typing import Iterable, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from .errors import from_rpc_error
from .v1 import layerd_pb2 as pb
from .v1 import layerd_pb2_grpc

#: The metadata key load balancers hash on; sent on every call of a session.
SESSION_HEADER = "x-session-id"

_DTYPES = {np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.float64): pb.DTYPE_FLOAT64}
_NUMPY = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT64: np.dtype("<f8")}

Array = Union[np.ndarray, Sequence[float], float]
Step = Tuple[str, "Layer", Array]


def to_tensor(array: Array) -> pb.Tensor:
    """A float32 or float64 array (any shape) as a wire tensor: C order, little-endian."""
    a = np.asarray(array)
    if a.dtype not in _DTYPES:
        raise TypeError(f"layerd computes float32 and float64 arrays; got {a.dtype} "
                        f"(convert with .astype(np.float32) or np.float64)")
    data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=_DTYPES[a.dtype], shape=a.shape, data=data)


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A wire tensor as a new, writable numpy array of its dtype and shape."""
    return np.frombuffer(tensor.data, dtype=_NUMPY[tensor.dtype]).reshape(tuple(tensor.shape)).astype(
        _NUMPY[tensor.dtype].newbyteorder("="), copy=True)


def _typed_errors(method):
    """Raise layerd.errors types instead of bare grpc.RpcError."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    return wrapper


class Client:
    """A connection to a layerd server.

    >>> client = layerd.Client("127.0.0.1:50051")
    >>> with client.session(idle_timeout=60) as s:
    ...     relu = s.layer("relu")
    ...     y = relu.forward(x)
    ...     dx = relu.backward(dout)
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, max_message_bytes: int = 64 << 20,
                 timeout: Optional[float] = None, channel: Optional[grpc.Channel] = None,
                 token: Optional[str] = None):
        """token: sent as `authorization: Bearer <token>` on every call, for a
        server started with --auth-tokens (use a TLS channel to keep it secret)."""
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = channel or grpc.insecure_channel(target, options=options)
        self._stub = layerd_pb2_grpc.LayerServiceStub(self._channel)
        self.timeout = timeout
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()

    def session(self, idle_timeout: int = 0, session_id: Optional[str] = None) -> "Session":
        """Opens a session; a context manager that closes it.

        The id is picked here (128 random bits) unless given, so every call,
        the first included, can carry it as x-session-id for a load balancer.
        idle_timeout is in seconds; 0 asks for the server default.
        """
        return Session(self, session_id or secrets.token_hex(16), idle_timeout)

    @_typed_errors
    def kinds(self) -> dict:
        """{name: description} of the layer kinds the server offers."""
        answer = self._stub.ListLayerKinds(pb.ListLayerKindsRequest(), metadata=self._auth,
                                           timeout=self.timeout)
        return {k.name: k.description for k in answer.kinds}

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Session:
    """A server session: layer instances and what they keep between Forward and Backward."""

    def __init__(self, client: Client, session_id: str, idle_timeout: int):
        self._client = client
        self._stub = client._stub
        self.id = session_id
        self._metadata = ((SESSION_HEADER, session_id),) + client._auth
        self._count = 0
        answer = self._call(self._stub.CreateSession,
                            pb.CreateSessionRequest(session_id=session_id, idle_timeout_seconds=idle_timeout))
        #: The idle timeout the server granted, in seconds.
        self.idle_timeout = answer.idle_timeout_seconds

    @_typed_errors
    def _call(self, rpc, request):
        return rpc(request, metadata=self._metadata, timeout=self._client.timeout)

    def layer(self, kind: str, layer_id: Optional[str] = None) -> "Layer":
        """Adds a layer instance of `kind` ("relu", "sigmoid", "identity")."""
        self._count += 1
        layer_id = layer_id or f"{kind}-{self._count}"
        self._call(self._stub.CreateLayer, pb.CreateLayerRequest(session_id=self.id, layer_id=layer_id, kind=kind))
        return Layer(self, layer_id, kind)

    @_typed_errors
    def run(self, steps: Iterable[Step]) -> list:
        """Runs ("forward" | "forward_no_grad" | "backward", layer, array) steps over one
        stream, in order, and returns their results. The first failing step raises,
        after the steps before it took effect."""

        def requests():
            for op, layer, array in steps:
                if op in ("forward", "forward_no_grad"):
                    yield pb.RunRequest(forward=pb.ForwardRequest(
                        session_id=self.id, layer_id=layer.id, x=to_tensor(array), no_grad=op == "forward_no_grad"))
                elif op == "backward":
                    yield pb.RunRequest(backward=pb.BackwardRequest(
                        session_id=self.id, layer_id=layer.id, dout=to_tensor(array)))
                else:
                    raise ValueError(f"step must be forward, forward_no_grad or backward; got {op!r}")

        results = []
        for answer in self._stub.Run(requests(), metadata=self._metadata, timeout=self._client.timeout):
            which = answer.WhichOneof("result")
            results.append(from_tensor(answer.forward.y if which == "forward" else answer.backward.dx))
        return results

    def close(self):
        """Closes the session; what it kept is freed."""
        self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=self.id))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Layer:
    """One layer instance in a session."""

    def __init__(self, session: Session, layer_id: str, kind: str):
        self.session = session
        self.id = layer_id
        self.kind = kind

    def forward(self, x: Array, no_grad: bool = False) -> np.ndarray:
        """y for x (float32 or float64, any shape); unless no_grad, the server keeps what Backward needs."""
        s = self.session
        answer = s._call(s._stub.Forward, pb.ForwardRequest(session_id=s.id, layer_id=self.id,
                                                            x=to_tensor(x), no_grad=no_grad))
        return from_tensor(answer.y)

    def backward(self, dout: Array) -> np.ndarray:
        """dx for the upstream gradient dout (the dtype and shape of the last keeping Forward's x)."""
        s = self.session
        answer = s._call(s._stub.Backward, pb.BackwardRequest(session_id=s.id, layer_id=self.id,
                                                              dout=to_tensor(dout)))
        return from_tensor(answer.dx)

    def __repr__(self):
        return f"Layer({self.kind!r}, id={self.id!r}, session={self.session.id!r})"

"""The numpy-friendly wrapper: Client -> Session -> Layer."""
from __future__ import annotations

import collections
import functools
import itertools
import os
import secrets
import time
from typing import Iterable, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from .errors import LayerdError, NotFound, from_rpc_error
from .retry import Retry
from .tensors import _DTYPES, _FLOATS, Array, _serialized, from_tensor, to_tensor  # noqa: F401 (re-exported)
from .v1 import layerd_pb2 as pb
from .v1 import layerd_pb2_grpc

#: The metadata key load balancers hash on; sent on every call of a session.
SESSION_HEADER = "x-session-id"
#: Metadata that orders a Step or TrainStep: run as the optimizer's update N + 1.
AFTER_STEPS_HEADER = "x-layerd-after-steps"

#: Each configurable kind's config message (a LayerConfig member of the same name).
_CONFIGS = {"affine": pb.AffineConfig, "dropout": pb.DropoutConfig, "batch_norm": pb.BatchNormConfig,
            "convolution": pb.ConvolutionConfig, "pooling": pb.PoolingConfig}
_INIT_METHODS = {"he": pb.Init.HE, "xavier": pb.Init.XAVIER, "normal": pb.Init.NORMAL}

Step = Tuple[str, "Layer", Array]


def _tensors(arrays) -> dict:
    return {name: to_tensor(value) for name, value in (arrays or {}).items()}


def _arrays(tensors) -> dict:
    return {name: from_tensor(t) for name, t in tensors.items()}


def _init(init, std, seed) -> Optional[pb.Init]:
    """Init from init="he" | "xavier" | "normal" (with std), and a seed."""
    if init is None and std is None and seed is None:
        return None
    if init is not None and init not in _INIT_METHODS:
        raise ValueError(f"init must be one of {', '.join(_INIT_METHODS)}; got {init!r}")
    return pb.Init(method=_INIT_METHODS.get(init or "he"), std=std or 0.0, seed=seed or 0)


def layer_config(kind: str, **config) -> Optional[pb.LayerConfig]:
    """The LayerConfig of a `kind` layer from keyword arguments named as the kind's config
    message's fields (in_features=, out_features=, kernel_h=, ratio=, ...); for affine and
    convolution also init= ("he", "xavier", "normal"), std= and seed=."""
    if kind not in _CONFIGS:
        if config:
            raise TypeError(f"a {kind} layer takes no config; got {', '.join(sorted(config))}")
        return None
    fields = dict(config)
    if kind in ("affine", "convolution"):
        init = _init(fields.pop("init", None), fields.pop("std", None), fields.pop("seed", None))
        if init is not None:
            fields["init"] = init
    message = _CONFIGS[kind]
    unknown = sorted(set(fields) - set(message.DESCRIPTOR.fields_by_name))
    if unknown:
        raise TypeError(f"{kind} takes {', '.join(message.DESCRIPTOR.fields_by_name)}; got {', '.join(unknown)}")
    return pb.LayerConfig(**{kind: message(**fields)})


def _dtype(dtype) -> int:
    """A numpy dtype (or None) as the wire enum."""
    if dtype is None:
        return pb.DTYPE_UNSPECIFIED
    d = np.dtype(dtype)
    if d not in _FLOATS:
        raise TypeError(f"dtype must be float32, float64, float16 or bfloat16; got {d}")
    return _DTYPES[d]


def _typed_errors(method):
    """Raise layerd.errors types instead of bare grpc.RpcError."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    return wrapper


def _pem(value, name):
    """PEM bytes from bytes (PEM itself) or a path (str or os.PathLike) to a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:
            return f.read()
    raise TypeError(f"{name} must be PEM bytes or a path to a PEM file; got {type(value).__name__}")


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
                 token: Optional[str] = None, root_certificates=None, private_key=None,
                 certificate_chain=None, credentials: Optional[grpc.ChannelCredentials] = None,
                 server_name: Optional[str] = None, retry: Retry = Retry()):
        """target: "host:port", or "https://host:port" for TLS with the system's roots.

        TLS: root_certificates (the CA that signed the server's certificate),
        and for mutual TLS private_key and certificate_chain — each PEM bytes or
        a path to a PEM file — or one ready grpc.ChannelCredentials as
        `credentials`; any of them turns TLS on. server_name: the name to check
        in the server's certificate when it differs from the target's host.
        token: sent as `authorization: Bearer <token>` on every call, for a
        server started with --auth-tokens (use TLS to keep it secret).
        max_message_bytes applies to the channel this client makes; a
        `channel` passed in is used as it is, with its own options (grpcio's
        default receive limit is 4 MiB).
        timeout: the deadline of each call attempt, in seconds (None: no deadline).
        retry: the retry policy of unary calls (see Retry).
        """
        if target.startswith("https://"):
            target, tls = target[len("https://"):], True
        else:
            target = target[len("http://"):] if target.startswith("http://") else target
            tls = False
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   # Reconnect within the retry policy's waits, not after grpcio's 1 s+ backoff.
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff * 1000))]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        pems = (root_certificates, private_key, certificate_chain)
        if channel is None and (tls or credentials is not None or any(p is not None for p in pems)):
            if (private_key is None) != (certificate_chain is None):
                raise ValueError("mutual TLS needs both private_key and certificate_chain")
            credentials = credentials or grpc.ssl_channel_credentials(
                _pem(root_certificates, "root_certificates"), _pem(private_key, "private_key"),
                _pem(certificate_chain, "certificate_chain"))
            channel = grpc.secure_channel(target, credentials, options=options)
        self._channel = channel or grpc.insecure_channel(target, options=options)
        self._stub = layerd_pb2_grpc.LayerServiceStub(self._channel)
        # The calls that carry large tensors, with requests serialized by _serialized.
        self._forward, self._backward, self._train_step = (
            self._channel.unary_unary(f"/layerd.v1.LayerService/{method}", request_serializer=None,
                                      response_deserializer=answer.FromString)
            for method, answer in (("Forward", pb.ForwardResponse), ("Backward", pb.BackwardResponse),
                                   ("TrainStep", pb.TrainStepResponse)))
        self.timeout = timeout
        self.retry = retry
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()

    def _unary(self, rpc, request, metadata, done_before=None, idempotent=True):
        """Calls a unary RPC under the retry policy. `done_before`: the reason that,
        answered to a retried attempt, means an earlier attempt took effect (its
        answer lost in transit): the call then returns None instead of raising.
        A call that is not idempotent (an unnumbered Step or TrainStep: a repeat would
        update the parameters twice) is retried only when the server shed it before it
        ran; a numbered one (`expected_step`) is, as a repeat applies nothing twice."""
        attempt = 1
        while True:
            try:
                return rpc(request, metadata=metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                typed = from_rpc_error(error)
                if attempt > 1 and done_before is not None and typed.reason == done_before:
                    return None
                retryable = typed.code == grpc.StatusCode.UNAVAILABLE and (idempotent or typed.reason == "OVERLOADED")
                if not retryable or attempt >= self.retry.attempts:
                    raise typed from None
                time.sleep(self.retry.backoff(attempt))
                attempt += 1

    def session(self, idle_timeout: int = 0, session_id: Optional[str] = None) -> "Session":
        """Opens a session; a context manager that closes it.

        The id is picked here (128 random bits) unless given, so every call,
        the first included, can carry it as x-session-id for a load balancer.
        idle_timeout is in seconds; 0 asks for the server default.
        """
        return Session(self, session_id or secrets.token_hex(16), idle_timeout)

    def import_session(self, checkpoint: bytes, idle_timeout: int = 0, session_id: Optional[str] = None) -> "Session":
        """A new session from a checkpoint (Session.export's bytes, or layerd.load's file):
        its layers, parameters, buffers, optimizers and their state, so training goes on
        bit for bit. Get handles with Session.get_layer / get_optimizer. A bad file raises
        InvalidArgument and creates nothing."""
        session_id = session_id or secrets.token_hex(16)
        return Session(self, session_id, idle_timeout, checkpoint=checkpoint)

    def attach(self, session_id: str) -> "Session":
        """A handle on a session that exists already (opened by another process, or before a
        restart of this one): get its layers and optimizers with Session.get_layer and
        Session.get_optimizer. Raises NotFound if there is none of that id."""
        return Session(self, session_id, 0, attach=True)

    def kinds(self) -> dict:
        """{name: description} of the layer kinds the server offers."""
        answer = self._unary(self._stub.ListLayerKinds, pb.ListLayerKindsRequest(), self._auth)
        return {k.name: k.description for k in answer.kinds}

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Session:
    """A server session: layer instances and what they keep between Forward and Backward."""

    def __init__(self, client: Client, session_id: str, idle_timeout: int, checkpoint: Optional[bytes] = None,
                 attach: bool = False):
        self._client = client
        self._stub = client._stub
        self.id = session_id
        self._metadata = ((SESSION_HEADER, session_id),) + client._auth
        self._count = 0
        if attach:
            self.idle_timeout = self.describe()["idle_timeout"]
            return
        # The id is this client's own (128 random bits): SESSION_EXISTS on a retry
        # means the first attempt created it.
        if checkpoint is None:
            rpc, request = self._stub.CreateSession, pb.CreateSessionRequest(
                session_id=session_id, idle_timeout_seconds=idle_timeout)
        else:
            rpc, request = self._stub.ImportSession, pb.ImportSessionRequest(
                session_id=session_id, idle_timeout_seconds=idle_timeout, safetensors=bytes(checkpoint))
        answer = self._call(rpc, request, done_before="SESSION_EXISTS")
        #: The idle timeout the server granted, in seconds (the one asked for when
        #: the answer was lost and a retry found the session).
        self.idle_timeout = answer.idle_timeout_seconds if answer else idle_timeout

    def _call(self, rpc, request, done_before=None, idempotent=True):
        return self._client._unary(rpc, request, self._metadata, done_before, idempotent)

    def layer(self, kind: str, layer_id: Optional[str] = None, *, params: Optional[dict] = None,
              dtype=None, **config) -> "Layer":
        """Adds a layer instance of `kind` (see Client.kinds()): "relu", "sigmoid", "identity",
        "softmax_with_loss", or a configured one, e.g.

            s.layer("affine", in_features=784, out_features=100, init="he", seed=1)
            s.layer("convolution", in_channels=1, out_channels=30, kernel_h=5, kernel_w=5, stride=1, pad=0)
            s.layer("pooling", pool_h=2, pool_w=2, stride=2)
            s.layer("batch_norm", num_features=100, momentum=0.9)
            s.layer("dropout", ratio=0.5, seed=7)

        params: initial values by name ({"W": ..., "b": ...}); the others are initialized as
        the config says. dtype: np.float32 or np.float64 for a layer with parameters
        (default: that of params, else float32); it then takes x of that dtype only (a float32
        layer also x in float16 or bfloat16; np.float16 or bfloat16 here make a float32 layer).
        """
        request = pb.CreateLayerRequest(kind=kind, params=_tensors(params), dtype=_dtype(dtype))
        config = layer_config(kind, **config)
        if config is not None:
            request.config.CopyFrom(config)
        return self._create(kind, layer_id, request)

    def sequential(self, members: Sequence, layer_id: Optional[str] = None, *, params: Optional[dict] = None,
                   dtype=None) -> "Layer":
        """Adds a sequential: its members run in order under one call (Forward) and in reverse
        (Backward). Each member is (name, kind) or (name, kind, {config, and "params"}):

            net = s.sequential([("fc1", "affine", {"in_features": 64, "out_features": 50}),
                                ("relu1", "relu"),
                                ("fc2", "affine", {"in_features": 50, "out_features": 10}),
                                ("loss", "softmax_with_loss")], dtype=np.float64)
            loss = net.forward(x, t=labels)
            dx, grads = net.backward(return_grads=True)   # grads["fc1.W"], ...

        Without t, Forward stops before a final loss layer and answers the scores.
        params: initial values named "<member>.<name>".
        """
        specs = []
        for member in members:
            name, kind, options = (tuple(member) + ({},))[:3]
            options = dict(options)
            spec = pb.LayerSpec(name=name, kind=kind, params=_tensors(options.pop("params", None)))
            config = layer_config(kind, **options)
            if config is not None:
                spec.config.CopyFrom(config)
            specs.append(spec)
        request = pb.CreateLayerRequest(kind="sequential", params=_tensors(params), dtype=_dtype(dtype),
                                        config=pb.LayerConfig(sequential=pb.SequentialConfig(layers=specs)))
        return self._create("sequential", layer_id, request)

    def _create(self, kind, layer_id, request) -> "Layer":
        self._count += 1
        generated = layer_id is None
        request.session_id = self.id
        request.layer_id = layer_id or f"{kind}-{self._count}"
        self._call(self._stub.CreateLayer, request, done_before="LAYER_EXISTS" if generated else None)
        return Layer(self, request.layer_id, kind)

    def optimizer(self, algorithm: str, *, layers: Sequence["Layer"] = (), optimizer_id: Optional[str] = None,
                  **hyperparameters) -> "Optimizer":
        """Adds a server-side optimizer over the parameters of `layers` (all layers of the
        session that have parameters, if none are given; a parameter belongs to one
        optimizer): "sgd" (lr=0.01), "momentum" (lr=0.01, momentum=0.9), "adagrad"
        (lr=0.01) or "adam" (lr=0.001, beta1=0.9, beta2=0.999), e.g.

            opt = s.optimizer("adam", lr=0.01, layers=[net])
            loss = net.train_step(x, t, opt)
        """
        messages = {"sgd": pb.Sgd, "momentum": pb.Momentum, "adagrad": pb.AdaGrad, "adam": pb.Adam}
        if algorithm not in messages:
            raise ValueError(f"algorithm must be one of {', '.join(messages)}; got {algorithm!r}")
        self._count += 1
        generated = optimizer_id is None
        optimizer_id = optimizer_id or f"{algorithm}-{self._count}"
        request = pb.CreateOptimizerRequest(session_id=self.id, optimizer_id=optimizer_id,
                                            layer_ids=[layer.id for layer in layers],
                                            **{algorithm: messages[algorithm](**hyperparameters)})
        self._call(self._stub.CreateOptimizer, request, done_before="OPTIMIZER_EXISTS" if generated else None)
        return Optimizer(self, optimizer_id, algorithm)

    def get_layer(self, layer_id: str, kind: str = "") -> "Layer":
        """A handle on a layer the session already has (an imported session's)."""
        return Layer(self, layer_id, kind)

    def get_optimizer(self, optimizer_id: str, algorithm: str = "") -> "Optimizer":
        """A handle on an optimizer the session already has (an imported session's, or one
        to resume), with its algorithm and step count as the server has them now
        (DescribeSession). Raises NotFound (OPTIMIZER_NOT_FOUND) if it has none of that id."""
        found = self.describe()["optimizers"].get(optimizer_id)
        if found is None:
            raise NotFound(grpc.StatusCode.NOT_FOUND,
                           f"session {self.id!r} has no optimizer {optimizer_id!r}",
                           "OPTIMIZER_NOT_FOUND", {"session_id": self.id, "optimizer_id": optimizer_id})
        return Optimizer(self, optimizer_id, found["algorithm"], steps=found["steps"])

    def describe(self) -> dict:
        """What the session holds (DescribeSession): {"layers": {id: {"kind", "dtype",
        "optimizer"}}, "optimizers": {id: {"algorithm", "steps", "layers", "stored_steps"}},
        "held_bytes", "replica_id", "idle_timeout"}. "steps" is where a resuming client goes on
        from; "stored_steps" the count a session store has (None without one); dtype is a numpy
        dtype, or None for a kind without parameters."""
        answer = self._call(self._stub.DescribeSession, pb.DescribeSessionRequest(session_id=self.id))
        dtypes = {code: dtype for dtype, code in _DTYPES.items()}
        return {
            "layers": {l.layer_id: {"kind": l.kind, "dtype": dtypes.get(l.dtype), "optimizer": l.optimizer_id or None}
                       for l in answer.layers},
            "optimizers": {o.optimizer_id: {"algorithm": o.algorithm, "steps": o.steps, "layers": list(o.layer_ids),
                                            "stored_steps": o.stored_steps if o.HasField("stored_steps") else None}
                           for o in answer.optimizers},
            "held_bytes": answer.held_bytes,
            "replica_id": answer.replica_id,
            "idle_timeout": answer.idle_timeout_seconds,
        }

    def export(self) -> bytes:
        """The session as a safetensors checkpoint: every parameter, buffer and optimizer
        state, with the layer and optimizer specifications in its metadata (kept state and
        gradients are not saved). Client.import_session makes a session of it again;
        safetensors.numpy.load reads its tensors ("layers.<layer>.<name>", ...)."""
        return self._call(self._stub.ExportSession, pb.ExportSessionRequest(session_id=self.id)).safetensors

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
        self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=self.id),
                   done_before="SESSION_NOT_FOUND")

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

    def forward(self, x: Array, t: Optional[Array] = None, *, eval: bool = False,
                no_grad: bool = False) -> np.ndarray:
        """y for x, in x's dtype (float32, float64, float16 or bfloat16; a layer with parameters
        takes its own dtype, a float32 one also the half types). t: the
        target of a loss layer (int64 class ids (N,), or probabilities like the scores); a
        loss answers the loss as a 0-d array. eval: evaluation mode (Dropout scales,
        BatchNorm uses its running statistics). Unless no_grad, the server keeps what
        Backward needs."""
        s = self.session
        request = _serialized(pb.ForwardRequest(session_id=s.id, layer_id=self.id, no_grad=no_grad, eval=eval),
                              x=x, t=t)
        return from_tensor(s._call(s._client._forward, request).y)

    def backward(self, dout: Optional[Array] = None, *, return_grads: bool = False):
        """dx for the upstream gradient dout (the dtype and shape of the last keeping
        Forward's y; None after a loss, meaning 1). The layer stores its parameter
        gradients; with return_grads the answer is (dx, {name: gradient})."""
        s = self.session
        request = _serialized(pb.BackwardRequest(session_id=s.id, layer_id=self.id, return_grads=return_grads),
                              dout=dout)
        answer = s._call(s._client._backward, request)
        dx = from_tensor(answer.dx)
        return (dx, _arrays(answer.grads)) if return_grads else dx

    def _params(self, include_grads=False):
        s = self.session
        return s._call(s._stub.GetParams, pb.GetParamsRequest(session_id=s.id, layer_id=self.id,
                                                                include_grads=include_grads))

    def params(self) -> dict:
        """The parameters by name ({"W": ..., "b": ...}; a sequential's as "fc1.W")."""
        return _arrays(self._params().params)

    def buffers(self) -> dict:
        """The buffers by name (BatchNorm's running_mean and running_var)."""
        return _arrays(self._params().buffers)

    def grads(self) -> dict:
        """The parameter gradients of the last Backward (empty before one, and after set_params)."""
        return _arrays(self._params(include_grads=True).grads)

    def set_params(self, values: dict) -> None:
        """Replaces parameters and/or buffers by name, all or nothing; each keeps its shape
        and dtype. Kept state and gradients are dropped."""
        s = self.session
        s._call(s._stub.SetParams, pb.SetParamsRequest(session_id=s.id, layer_id=self.id, values=_tensors(values)))

    def train_step(self, x: Array, t: Array, optimizer: "Optimizer", *, return_dx: bool = False,
                   return_scores: bool = False):
        """One training step in one round trip: Forward of x with target t (keeping, training
        mode) through this layer (a sequential ending in softmax_with_loss, or that loss
        alone), Backward from the loss, and an update of every parameter `optimizer` owns.
        All or nothing. Answers the loss (a float, computed before the update); with
        return_dx, (loss, dx) — dloss/dx, for a client that trains the layers below
        (split learning); with return_scores, the scores (the loss layer's input) follow.

        Numbered with `expected_step` = optimizer.steps (when known) and applied exactly once,
        as Optimizer.step: a retry after a lost answer gets the first answer bit for bit."""
        s = self.session
        after = optimizer.steps
        request = self._train_step_request(x, t, optimizer, return_dx, return_scores, after)
        answer = s._call(s._client._train_step, request, idempotent=after is not None)
        return self._train_step_answer(answer, optimizer)

    def train_steps(self, batches: Iterable, optimizer: "Optimizer", *, depth: int = 3,
                    return_dx: bool = False, return_scores: bool = False):
        """train_step for each (x, t) of `batches`, pipelined: up to `depth` TrainSteps in
        flight, so the server computes one step while the next is encoded and sent. Yields
        what train_step answers, in order. The parameters are exactly those of the same steps
        one after another: each call carries its `expected_step`, numbered from
        `optimizer.steps`, and the server runs them in that order (if another client has
        stepped the optimizer since, the first raises FailedPrecondition STEP_OUT_OF_ORDER).
        Not retried. On an error the later calls are cancelled, then it is raised; the steps
        before it were applied. Leaving the loop early waits for the steps already sent."""
        if depth < 1:
            raise ValueError(f"depth must be at least 1; got {depth}")
        s = self.session
        pending = collections.deque()
        batches, after, failed = iter(batches), optimizer.steps or 0, False

        def result(future):
            try:
                return self._train_step_answer(future.result(), optimizer)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None

        try:
            while True:
                for x, t in itertools.islice(batches, depth - len(pending)):
                    request = self._train_step_request(x, t, optimizer, return_dx, return_scores, after)
                    pending.append(s._client._train_step.future(request, metadata=s._metadata,
                                                                timeout=s._client.timeout))
                    after += 1
                if not pending:
                    return
                yield result(pending.popleft())
        except BaseException as error:
            failed = not isinstance(error, GeneratorExit)
            raise
        finally:
            while pending:  # cancelled after an error; waited for when the caller stops early
                future = pending.popleft()
                if failed:
                    future.cancel()
                else:
                    try:
                        result(future)
                    except LayerdError:
                        failed = True

    def _train_step_request(self, x, t, optimizer, return_dx, return_scores, after) -> bytes:
        return _serialized(pb.TrainStepRequest(session_id=self.session.id, layer_id=self.id,
                                               optimizer_id=optimizer.id, return_dx=return_dx,
                                               return_scores=return_scores, expected_step=after), x=x, t=t)

    def _train_step_answer(self, answer, optimizer):
        """The loss, with dx and the scores after it when they were asked for."""
        optimizer.steps = answer.steps
        extra = ([from_tensor(answer.dx)] if answer.HasField("dx") else []) + (
            [from_tensor(answer.scores)] if answer.HasField("scores") else [])
        return tuple([answer.loss] + extra) if extra else answer.loss

    def __repr__(self):
        return f"Layer({self.kind!r}, id={self.id!r}, session={self.session.id!r})"


class Optimizer:
    """A server-side optimizer of a session (Session.optimizer)."""

    def __init__(self, session: Session, optimizer_id: str, algorithm: str, steps: Optional[int] = 0):
        self.session = session
        self.id = optimizer_id
        self.algorithm = algorithm
        #: Updates applied so far, as of this client's last Step or TrainStep with it: the next
        #: step's expected_step (None: unknown, and the next step goes unnumbered).
        self.steps = steps

    def step(self) -> int:
        """One update of every parameter it owns from its stored gradient (the last
        Backward's); answers the number of updates applied so far.

        Sent with `expected_step` = `steps` (when known), so it is applied exactly once: it is
        retried on UNAVAILABLE like any call, and a retry of a step that was applied (its
        answer lost with a connection or a replica) answers the same count and applies
        nothing. If another client stepped the optimizer since, it raises FailedPrecondition
        STEP_OUT_OF_ORDER (`error.metadata["got"]` is the count now)."""
        s = self.session
        request = pb.StepRequest(session_id=s.id, optimizer_id=self.id, expected_step=self.steps)
        self.steps = s._call(s._stub.Step, request, idempotent=self.steps is not None).steps
        return self.steps

    def __repr__(self):
        return f"Optimizer({self.algorithm!r}, id={self.id!r}, session={self.session.id!r})"


def save(session: Session, path: Union[str, "os.PathLike"]) -> None:
    """Writes session.export() to `path` atomically (a temporary file beside it, then a rename)."""
    data = session.export()
    temporary = f"{os.fspath(path)}.{secrets.token_hex(4)}.tmp"
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def load(client: Client, path: Union[str, "os.PathLike"], idle_timeout: int = 0,
         session_id: Optional[str] = None) -> Session:
    """A new session from a checkpoint file written by save (or any ExportSession answer)."""
    with open(path, "rb") as f:
        return client.import_session(f.read(), idle_timeout=idle_timeout, session_id=session_id)

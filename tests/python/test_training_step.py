"""Optimizers, Step and TrainStep through a plain grpcio client.

- Each optimizer, in float32 and float64, over many steps from the server's own gradients,
  leaves parameters bit-identical to the tests' numpy reference optimizers.
- TrainStep gives bit for bit what Forward + Backward + Step give, answers the loss, dx and
  scores on request, and trains a network to a lower loss (within tolerance of the reference).
- Errors: NO_GRADIENTS, a parameter owned twice, an optimizer that does not own TrainStep's
  layer, unknown optimizers, bad hyperparameters, a missing target.
- A TrainStep that times out, is cancelled or fails leaves parameters, buffers, gradients,
  optimizer state, kept state and the step count as they were.
- Numbered TrainSteps apply in their order, sent in any order, also on a server with one async
  worker thread (--worker-threads 1); a different request with a number already applied fails
  (a retry of the same request: test_exactly_once.py).
"""
import json
import time
import uuid

import grpc
import numpy as np
import pytest

import reference_training as ref
from layerd_server import Server
from test_training_layers import DTYPES, bits_equal, close, from_tensor, to_tensor

ALGORITHMS = {
    "sgd": (lambda pb2: dict(sgd=pb2.Sgd(lr=0.1)), lambda: ref.SGD(lr=0.1)),
    "momentum": (lambda pb2: dict(momentum=pb2.Momentum(lr=0.05, momentum=0.8)),
                 lambda: ref.Momentum(lr=0.05, momentum=0.8)),
    "adagrad": (lambda pb2: dict(adagrad=pb2.AdaGrad(lr=0.3)), lambda: ref.AdaGrad(lr=0.3)),
    "adam": (lambda pb2: dict(adam=pb2.Adam()), lambda: ref.Adam()),  # the defaults
}


def session(pb2, stub):
    return stub.CreateSession(pb2.CreateSessionRequest(session_id=uuid.uuid4().hex)).session_id


def params_of(pb2, stub, sid, layer, include_grads=False):
    r = stub.GetParams(pb2.GetParamsRequest(session_id=sid, layer_id=layer, include_grads=include_grads))
    conv = lambda m: {k: from_tensor(pb2, v).copy() for k, v in m.items()}  # noqa: E731
    return conv(r.params), conv(r.buffers), conv(r.grads)


def two_layer(pb2, stub, sid, dtype, layer="net", seed=0, inputs=6, hidden=5, classes=3):
    """affine → relu → affine → softmax_with_loss with seeded client-given weights."""
    r = np.random.default_rng(seed)
    member = lambda name, kind, **c: pb2.LayerSpec(name=name, kind=kind, config=pb2.LayerConfig(**c))  # noqa: E731
    config = pb2.LayerConfig(sequential=pb2.SequentialConfig(layers=[
        member("fc1", "affine", affine=pb2.AffineConfig(in_features=inputs, out_features=hidden)),
        member("relu", "relu"),
        member("fc2", "affine", affine=pb2.AffineConfig(in_features=hidden, out_features=classes)),
        member("loss", "softmax_with_loss")]))
    p = {"fc1.W": r.standard_normal((inputs, hidden)) * 0.5, "fc1.b": np.zeros(hidden),
         "fc2.W": r.standard_normal((hidden, classes)) * 0.5, "fc2.b": np.zeros(classes)}
    p = {k: v.astype(dtype) for k, v in p.items()}
    request = pb2.CreateLayerRequest(session_id=sid, layer_id=layer, kind="sequential", config=config)
    for name, value in p.items():
        request.params[name].CopyFrom(to_tensor(pb2, value))
    stub.CreateLayer(request)
    return p


def data(dtype, n=8, inputs=6, classes=3, seed=1):
    r = np.random.default_rng(seed)
    return r.standard_normal((n, inputs)).astype(dtype), r.integers(0, classes, n).astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_each_optimizer_is_bit_identical_to_the_reference_over_many_steps(pb, stub, name, dtype):
    pb2, _ = pb
    wire, reference = ALGORITHMS[name]
    sid = session(pb2, stub)
    r = np.random.default_rng(5)
    params = {"W": (r.standard_normal((4, 3)) * 0.5).astype(dtype), "b": r.standard_normal(3).astype(dtype)}
    request = pb2.CreateLayerRequest(session_id=sid, layer_id="fc", kind="affine",
                                     config=pb2.LayerConfig(affine=pb2.AffineConfig(in_features=4, out_features=3)))
    for k, v in params.items():
        request.params[k].CopyFrom(to_tensor(pb2, v))
    stub.CreateLayer(request)
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="opt", **wire(pb2)))
    want, optimizer = {k: v.copy() for k, v in params.items()}, reference()
    for step in range(1, 31):
        x = r.standard_normal((5, 4)).astype(dtype)
        stub.Forward(pb2.ForwardRequest(session_id=sid, layer_id="fc", x=to_tensor(pb2, x)))
        dout = (r.standard_normal((5, 3)) * 3).astype(dtype)
        grads = stub.Backward(pb2.BackwardRequest(session_id=sid, layer_id="fc", dout=to_tensor(pb2, dout),
                                                  return_grads=True)).grads
        grads = {k: from_tensor(pb2, v) for k, v in grads.items()}
        assert stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="opt")).steps == step
        optimizer.update(want, grads)
        got, _, _ = params_of(pb2, stub, sid, "fc")
        for k in want:
            bits_equal(got[k], want[k], f"{name} step {step} {k}")
    assert not np.array_equal(want["W"], params["W"]), "the parameters moved"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_train_step_is_forward_backward_step_in_one_call(pb, stub, dtype):
    pb2, _ = pb
    one, three = session(pb2, stub), session(pb2, stub)
    for sid in (one, three):
        two_layer(pb2, stub, sid, dtype)
        stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="adam",
                                                        adam=pb2.Adam(lr=0.01)))
    x, t = data(dtype)
    for step in range(1, 6):
        # Without return_dx the first layer skips its dx product: the update must not change.
        answer = stub.TrainStep(pb2.TrainStepRequest(
            session_id=one, layer_id="net", optimizer_id="adam", x=to_tensor(pb2, x), t=to_tensor(pb2, t),
            return_dx=step % 2 == 1, return_scores=True))
        scores = from_tensor(pb2, stub.Forward(pb2.ForwardRequest(session_id=three, layer_id="net",
                                                                   x=to_tensor(pb2, x), no_grad=True)).y)
        loss = from_tensor(pb2, stub.Forward(pb2.ForwardRequest(session_id=three, layer_id="net",
                                                                x=to_tensor(pb2, x), t=to_tensor(pb2, t))).y)
        dx = from_tensor(pb2, stub.Backward(pb2.BackwardRequest(session_id=three, layer_id="net")).dx)
        assert stub.Step(pb2.StepRequest(session_id=three, optimizer_id="adam")).steps == step
        assert answer.steps == step
        assert answer.loss == float(loss), (answer.loss, loss)
        if step % 2 == 1:
            bits_equal(from_tensor(pb2, answer.dx), dx, "dx")
        else:
            assert not answer.HasField("dx")
        bits_equal(from_tensor(pb2, answer.scores), scores, "scores")
    a, _, ga = params_of(pb2, stub, one, "net", include_grads=True)
    b, _, gb = params_of(pb2, stub, three, "net", include_grads=True)
    for k in a:
        bits_equal(a[k], b[k], k)
        bits_equal(ga[k], gb[k], "grad " + k)
    # Without return_dx / return_scores those fields stay empty.
    answer = stub.TrainStep(pb2.TrainStepRequest(session_id=one, layer_id="net", optimizer_id="adam",
                                                 x=to_tensor(pb2, x), t=to_tensor(pb2, t)))
    assert not answer.HasField("dx") and not answer.HasField("scores") and answer.steps == 6


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_training_with_sgd_follows_the_reference_and_lowers_the_loss(pb, stub, dtype):
    pb2, _ = pb
    sid = session(pb2, stub)
    p = two_layer(pb2, stub, sid, dtype, seed=3)
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="sgd", sgd=pb2.Sgd(lr=0.5)))
    fc1, fc2 = ref.Affine(p["fc1.W"].copy(), p["fc1.b"].copy()), ref.Affine(p["fc2.W"].copy(), p["fc2.b"].copy())
    net = ref.Sequential([("fc1", fc1), ("relu", ref.Relu()), ("fc2", fc2), ("loss", ref.SoftmaxWithLoss())])
    sgd = ref.SGD(lr=0.5)
    x, t = data(dtype, n=20, seed=4)
    losses = []
    for _ in range(40):
        answer = stub.TrainStep(pb2.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="sgd",
                                                     x=to_tensor(pb2, x), t=to_tensor(pb2, t)))
        want = net.forward(x, t=t)
        net.backward()
        sgd.update({"fc1.W": fc1.W, "fc1.b": fc1.b, "fc2.W": fc2.W, "fc2.b": fc2.b}, net.grads())
        assert abs(answer.loss - float(want)) <= 50 * ref_tol(dtype) * abs(float(want)), (answer.loss, want)
        losses.append(answer.loss)
    got, _, _ = params_of(pb2, stub, sid, "net")
    for k, v in {"fc1.W": fc1.W, "fc2.W": fc2.W}.items():
        close(got[k], v, k) if dtype == np.float64 else None
    assert losses[-1] < 0.5 * losses[0], losses


def ref_tol(dtype):
    return {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}[np.dtype(dtype)]


def code_and_reason(error):
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2
    status = rpc_status.from_call(error)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return error.code(), info.reason
    return error.code(), None


def fails(call, code, reason, *words):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert code_and_reason(caught.value) == (code, reason), caught.value.details()
    for word in words:
        assert word in caught.value.details(), (word, caught.value.details())


def test_optimizer_errors_name_what_is_wrong(pb, stub):
    pb2, _ = pb
    sid = session(pb2, stub)
    two_layer(pb2, stub, sid, np.float64)
    two_layer(pb2, stub, sid, np.float64, layer="other")
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="act", kind="relu"))
    C = grpc.StatusCode
    create = lambda oid, ids=(), **alg: stub.CreateOptimizer(pb2.CreateOptimizerRequest(  # noqa: E731
        session_id=sid, optimizer_id=oid, layer_ids=list(ids), **alg))
    fails(lambda: create("o"), C.INVALID_ARGUMENT, "MISSING_ALGORITHM", "algorithm")
    fails(lambda: create("o", sgd=pb2.Sgd(lr=-1)), C.INVALID_ARGUMENT, "INVALID_CONFIG", "sgd.lr", "-1")
    fails(lambda: create("o", sgd=pb2.Sgd(lr=float("nan"))), C.INVALID_ARGUMENT, "INVALID_CONFIG", "sgd.lr")
    fails(lambda: create("o", adam=pb2.Adam(beta1=1.0)), C.INVALID_ARGUMENT, "INVALID_CONFIG", "adam.beta1")
    fails(lambda: create("o", momentum=pb2.Momentum(momentum=-0.1)), C.INVALID_ARGUMENT, "INVALID_CONFIG",
          "momentum.momentum")
    fails(lambda: create("o", ["act"], sgd=pb2.Sgd()), C.INVALID_ARGUMENT, "NO_PARAMS", "layer_ids[0]", "relu")
    fails(lambda: create("o", ["net", "net"], sgd=pb2.Sgd()), C.INVALID_ARGUMENT, "DUPLICATE_LAYER", "layer_ids[1]")
    fails(lambda: create("o", ["nope"], sgd=pb2.Sgd()), C.NOT_FOUND, "LAYER_NOT_FOUND", "nope")
    fails(lambda: create("bad id", sgd=pb2.Sgd()), C.INVALID_ARGUMENT, "INVALID_ID", "optimizer_id")
    create("a", ["net"], sgd=pb2.Sgd())
    fails(lambda: create("a", ["other"], sgd=pb2.Sgd()), C.ALREADY_EXISTS, "OPTIMIZER_EXISTS", '"a"')
    fails(lambda: create("b", ["other", "net"], sgd=pb2.Sgd()), C.ALREADY_EXISTS, "PARAMS_OWNED", '"net"', '"a"')
    # The failed "b" claimed nothing: "other" is still free, and "b" may be created.
    create("b", ["other"], adam=pb2.Adam())
    # Every layer with parameters is owned now: an optimizer over "all of them" takes nothing.
    fails(lambda: create("c", sgd=pb2.Sgd()), C.ALREADY_EXISTS, "PARAMS_OWNED")
    step = lambda oid: stub.Step(pb2.StepRequest(session_id=sid, optimizer_id=oid))  # noqa: E731
    fails(lambda: step("a"), C.FAILED_PRECONDITION, "NO_GRADIENTS", "fc1.W", '"net"')
    fails(lambda: step("zzz"), C.NOT_FOUND, "OPTIMIZER_NOT_FOUND", "zzz")
    x, t = data(np.float64)
    train = lambda layer, oid, **kw: stub.TrainStep(pb2.TrainStepRequest(  # noqa: E731
        session_id=sid, layer_id=layer, optimizer_id=oid, x=to_tensor(pb2, x), **kw))
    fails(lambda: train("other", "a", t=to_tensor(pb2, t)), C.INVALID_ARGUMENT, "NOT_OWNED", "layer_id", '"a"')
    fails(lambda: train("net", "a"), C.INVALID_ARGUMENT, "MISSING_TENSOR", "t")
    fails(lambda: train("act", "a", t=to_tensor(pb2, t)), C.INVALID_ARGUMENT, "NOT_OWNED", "layer_id")
    bad = np.array([0, 1, 7, 0, 0, 0, 0, 0], np.int64)
    fails(lambda: train("net", "a", t=to_tensor(pb2, bad)), C.INVALID_ARGUMENT, "INVALID_TARGET", "t", "7")
    assert train("net", "a", t=to_tensor(pb2, t)).steps == 1

    # An optimizer over two layers: TrainStep on one updates the other from its stored
    # gradients, so without them the step fails, under its locks, and changes nothing.
    sid2 = session(pb2, stub)
    two_layer(pb2, stub, sid2, np.float64, layer="top")
    two_layer(pb2, stub, sid2, np.float64, layer="side")
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid2, optimizer_id="both", momentum=pb2.Momentum()))
    before, _, _ = params_of(pb2, stub, sid2, "top")
    fails(lambda: stub.TrainStep(pb2.TrainStepRequest(session_id=sid2, layer_id="top", optimizer_id="both",
                                                      x=to_tensor(pb2, x), t=to_tensor(pb2, t))),
          C.FAILED_PRECONDITION, "NO_GRADIENTS", '"side"')
    after, _, grads = params_of(pb2, stub, sid2, "top", include_grads=True)
    assert not grads and all(np.array_equal(before[k], after[k]) for k in before)
    fails(lambda: stub.Backward(pb2.BackwardRequest(session_id=sid2, layer_id="top")),
          C.FAILED_PRECONDITION, "NOTHING_KEPT")
    stub.Forward(pb2.ForwardRequest(session_id=sid2, layer_id="side", x=to_tensor(pb2, x), t=to_tensor(pb2, t)))
    stub.Backward(pb2.BackwardRequest(session_id=sid2, layer_id="side"))
    side_before, _, _ = params_of(pb2, stub, sid2, "side")
    assert stub.TrainStep(pb2.TrainStepRequest(session_id=sid2, layer_id="top", optimizer_id="both",
                                               x=to_tensor(pb2, x), t=to_tensor(pb2, t))).steps == 1
    side_after, _, _ = params_of(pb2, stub, sid2, "side")
    assert not np.array_equal(side_before["fc1.W"], side_after["fc1.W"]), "the other layer was updated too"


def test_a_train_step_that_fails_or_is_abandoned_changes_nothing(pb, stub):
    pb2, _ = pb
    sid = session(pb2, stub)
    member = lambda name, kind, **c: pb2.LayerSpec(name=name, kind=kind, config=pb2.LayerConfig(**c))  # noqa: E731
    # Big enough that a step takes well over the deadlines below.
    config = pb2.LayerConfig(sequential=pb2.SequentialConfig(layers=[
        member("conv", "convolution", convolution=pb2.ConvolutionConfig(in_channels=1, out_channels=16,
                                                                        kernel_h=5, kernel_w=5)),
        member("bn", "batch_norm", batch_norm=pb2.BatchNormConfig(num_features=16)),
        member("drop", "dropout", dropout=pb2.DropoutConfig(ratio=0.3, seed=9)),
        member("fc", "affine", affine=pb2.AffineConfig(in_features=16 * 60 * 60, out_features=10)),
        member("loss", "softmax_with_loss")]))
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="net", kind="sequential", config=config))
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="adam", adam=pb2.Adam()))
    r = np.random.default_rng(2)
    x = r.standard_normal((32, 1, 64, 64)).astype(np.float32)
    t = r.integers(0, 10, 32).astype(np.int64)
    request = pb2.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="adam",
                                   x=to_tensor(pb2, x), t=to_tensor(pb2, t))
    first = stub.TrainStep(request)
    assert first.steps == 1

    def snapshot():
        # Backward first: it stores the gradients it computes from the kept state and the
        # current parameters, which then must be the same each time.
        dx = from_tensor(pb2, stub.Backward(pb2.BackwardRequest(session_id=sid, layer_id="net")).dx).copy()
        params, buffers, grads = params_of(pb2, stub, sid, "net", include_grads=True)
        return params, buffers, grads, dx

    before = snapshot()
    abandoned = 0
    for i in range(6):
        if i % 2:
            future = stub.TrainStep.future(request)
            time.sleep(0.005)
            if future.cancel():
                abandoned += 1
        else:
            with pytest.raises(grpc.RpcError) as caught:
                stub.TrainStep(request, timeout=0.005)
            # grpcio says CANCELLED ("Timeout expired") when the deadline passes while it sends.
            assert caught.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
            abandoned += 1
    time.sleep(1.0)  # calls the server still had in hand are dropped
    after = snapshot()
    for b, a in zip(before[:3], after[:3]):
        assert b.keys() == a.keys()
        for k in b:
            bits_equal(a[k], b[k], k)
    bits_equal(after[3], before[3], "dx from the kept state")
    # The step count too: the next step is the second, and gives what an untouched session gives.
    assert stub.TrainStep(request).steps == 2
    assert abandoned >= 4


AFTER = "x-layerd-after-steps"


#: Input widths of a TrainStep computed inline by the async worker that decoded it (6), and of one
#: large enough for the blocking pool (8 x 3000 elements), which waits in its optimizer's queue.
WIDTHS = pytest.mark.parametrize("inputs", [6, 3000], ids=["inline", "queued"])


@WIDTHS
def test_numbered_steps_apply_in_their_order_whatever_order_they_arrive_in(pb, stub, inputs):
    """Eight TrainSteps sent at once in reverse order, each numbered with x-layerd-after-steps,
    give bit for bit the parameters and losses of the same steps one after another."""
    numbered_steps_apply_in_order(pb, stub, inputs)


@pytest.fixture(scope="module")
def one_worker(pb):
    """A server with a single async worker thread (--worker-threads 1) and a stub for it."""
    s = Server("--worker-threads", "1")
    with s.channel() as channel:
        yield s, pb[1].LayerServiceStub(channel)
    assert s.stop() == 0


@WIDTHS
def test_one_worker_thread_serves_numbered_steps_queued_and_inline(pb, one_worker, inputs):
    """With --worker-threads 1 the one worker decodes every call while steps wait in their
    optimizer's queue or compute inline on it: the same bits as steps one after another."""
    server, stub = one_worker
    serving = [json.loads(line) for line in server.log if '"layerd serving"' in line]
    assert serving and serving[0]["worker_threads"] == 1, server.log
    numbered_steps_apply_in_order(pb, stub, inputs)


def numbered_steps_apply_in_order(pb, stub, inputs):
    pb2, _ = pb
    batches = [data(np.float64, seed=s, inputs=inputs) for s in range(8)]

    def trained(ordered):
        sid = session(pb2, stub)
        two_layer(pb2, stub, sid, np.float64, inputs=inputs)
        stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="opt",
                                                        momentum=pb2.Momentum(lr=0.1, momentum=0.9)))
        requests = [pb2.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="opt",
                                         x=to_tensor(pb2, x), t=to_tensor(pb2, t)) for x, t in batches]
        if not ordered:
            answers = [stub.TrainStep(r) for r in requests]
        else:
            futures = {}
            for k in reversed(range(len(requests))):  # the last step first
                futures[k] = stub.TrainStep.future(requests[k], metadata=((AFTER, str(k)),))
                time.sleep(0.01)  # so it really arrives before the steps it follows
            answers = [futures[k].result(timeout=30) for k in range(len(requests))]
        assert [a.steps for a in answers] == list(range(1, 9))
        return [a.loss for a in answers], params_of(pb2, stub, sid, "net")[0]

    (want_losses, want), (got_losses, got) = trained(False), trained(True)
    assert got_losses == want_losses
    for k in want:
        bits_equal(got[k], want[k], k)


def sgd_session(pb2, stub, inputs):
    """A session with the two-layer network and SGD "opt" over it, and a TrainStep request for it."""
    sid = session(pb2, stub)
    two_layer(pb2, stub, sid, np.float64, inputs=inputs)
    stub.CreateOptimizer(pb2.CreateOptimizerRequest(session_id=sid, optimizer_id="opt", sgd=pb2.Sgd(lr=0.1)))
    x, t = data(np.float64, inputs=inputs)
    return sid, pb2.TrainStepRequest(session_id=sid, layer_id="net", optimizer_id="opt",
                                     x=to_tensor(pb2, x), t=to_tensor(pb2, t))


@WIDTHS
def test_a_numbered_step_the_optimizer_is_past_fails_and_changes_nothing(pb, stub, inputs):
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, inputs)
    assert stub.TrainStep(request, metadata=((AFTER, "0"),)).steps == 1
    assert stub.TrainStep(request, metadata=((AFTER, "1"),)).steps == 2
    before = params_of(pb2, stub, sid, "net", include_grads=True)
    # Another step 2 (a client's view gone stale): refused, with what was expected and found.
    # (The same request again is a retry, answered as the first time: test_exactly_once.py.)
    other = type(request)()
    other.CopyFrom(request)
    other.return_scores = True
    with pytest.raises(grpc.RpcError) as caught:
        stub.TrainStep(other, metadata=((AFTER, "1"),))
    assert code_and_reason(caught.value) == (grpc.StatusCode.FAILED_PRECONDITION, "STEP_OUT_OF_ORDER")
    assert "follow update 1" in caught.value.details() and "has applied 2" in caught.value.details()
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2
    info = error_details_pb2.ErrorInfo()
    assert rpc_status.from_call(caught.value).details[0].Unpack(info)
    assert dict(info.metadata) == {"optimizer_id": "opt", "expected": "1", "got": "2"}
    fails(lambda: stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="opt"), metadata=((AFTER, "0"),)),
          grpc.StatusCode.FAILED_PRECONDITION, "STEP_OUT_OF_ORDER", '"opt"')
    after = params_of(pb2, stub, sid, "net", include_grads=True)
    for b, a in zip(before, after):
        for k in b:
            bits_equal(a[k], b[k], k)
    # A step numbered ahead waits for its turn; its deadline ends the wait, with nothing changed.
    with pytest.raises(grpc.RpcError) as caught:
        stub.TrainStep(request, metadata=((AFTER, "5"),), timeout=0.3)
    # grpcio says CANCELLED ("Timeout expired") when the deadline passes before the server answers
    # it, as on a busy machine; the server's own answer is DEADLINE_EXCEEDED.
    assert caught.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    for b, a in zip(before, params_of(pb2, stub, sid, "net", include_grads=True)):
        for k in b:
            bits_equal(a[k], b[k], k)
    # Step (from the stored gradients) takes the header too; so does an unnumbered call after it.
    assert stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="opt"), metadata=((AFTER, "2"),)).steps == 3
    assert stub.TrainStep(request).steps == 4
    for bad in ("-1", "two", "", "18446744073709551616"):
        fails(lambda: stub.TrainStep(request, metadata=((AFTER, bad),)),
              grpc.StatusCode.INVALID_ARGUMENT, "INVALID_HEADER", AFTER)


@WIDTHS
def test_a_waiting_numbered_step_runs_when_another_call_moves_the_count_and_fails_when_passed(pb, stub, inputs):
    """A numbered TrainStep waits until the count is its number, whichever call moves the count
    (here a Step, which never queues); of two different requests with the same number, one is
    applied and the other, still waiting then, fails with STEP_OUT_OF_ORDER."""
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, inputs)
    assert stub.TrainStep(request).steps == 1  # gradients for the Step below
    other = type(request)()
    other.CopyFrom(request)
    other.return_dx = True
    first = stub.TrainStep.future(request, metadata=((AFTER, "2"),))
    time.sleep(0.2)
    second = stub.TrainStep.future(other, metadata=((AFTER, "2"),))
    time.sleep(0.2)
    assert not first.done() and not second.done()
    assert stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="opt")).steps == 2
    applied, refused = [], []
    for future in (first, second):
        try:
            applied.append(future.result(timeout=30).steps)
        except grpc.RpcError as error:
            refused.append(error)
    assert applied == [3] and len(refused) == 1
    assert code_and_reason(refused[0]) == (grpc.StatusCode.FAILED_PRECONDITION, "STEP_OUT_OF_ORDER")
    assert "follow update 2" in refused[0].details() and "has applied 3" in refused[0].details()
    assert stub.TrainStep(request).steps == 4

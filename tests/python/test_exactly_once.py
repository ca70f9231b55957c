"""Exactly-once steps through a plain grpcio client: `expected_step` on StepRequest and
TrainStepRequest (or the `x-layerd-after-steps` header) numbers a step; the same request again
once it was applied — a retry whose answer was lost — answers the first attempt's answer bit for
bit and applies nothing; any other request with a number already applied fails with
STEP_OUT_OF_ORDER and the count in its ErrorInfo; field and header must agree.

Each case runs with a TrainStep computed inline and with one large enough to wait in its
optimizer's queue (the two places a numbered call can find its number already applied).
"""
import time

import grpc
import numpy as np
import pytest

from test_training_layers import bits_equal, from_tensor
from test_training_step import AFTER, WIDTHS, code_and_reason, data, fails, params_of, sgd_session, to_tensor


def numbered(request, n):
    """A copy of `request` with expected_step = n."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.expected_step = n
    return copy


def same_answer(a, b, pb2):
    assert a.steps == b.steps
    assert np.float64(a.loss).tobytes() == np.float64(b.loss).tobytes()
    for name in ("dx", "scores"):
        assert a.HasField(name) == b.HasField(name), name
        if a.HasField(name):
            bits_equal(from_tensor(pb2, getattr(a, name)), from_tensor(pb2, getattr(b, name)), name)


def state(pb2, stub, sid):
    return params_of(pb2, stub, sid, "net", include_grads=True)


def unchanged(before, after):
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            bits_equal(a[k], b[k], k)


@WIDTHS
def test_a_retried_train_step_answers_the_first_answer_and_applies_nothing(pb, stub, inputs):
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, inputs)
    request.return_dx = request.return_scores = True
    first = stub.TrainStep(numbered(request, 0))
    assert first.steps == 1
    before = state(pb2, stub, sid)
    again = stub.TrainStep(numbered(request, 0))
    same_answer(first, again, pb2)
    unchanged(before, state(pb2, stub, sid))
    # By the header as well; and the next step goes on from there.
    same_answer(first, stub.TrainStep(request, metadata=((AFTER, "0"),)), pb2)
    assert stub.TrainStep(numbered(request, 1)).steps == 2
    # Only the last update is answered again: the first one is now past.
    fails(lambda: stub.TrainStep(numbered(request, 0)),
          grpc.StatusCode.FAILED_PRECONDITION, "STEP_OUT_OF_ORDER", '"opt"')


@WIDTHS
def test_a_different_request_with_an_applied_number_fails_with_the_count(pb, stub, inputs):
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, inputs)
    assert stub.TrainStep(numbered(request, 0)).steps == 1
    before = state(pb2, stub, sid)
    x, t = data(np.float64, inputs=inputs, seed=9)
    other = numbered(request, 0)
    other.x.CopyFrom(to_tensor(pb2, x))
    variants = [other, numbered(request, 0)]
    variants[1].return_dx = True  # what it answers is part of the request too
    for variant in variants:
        with pytest.raises(grpc.RpcError) as caught:
            stub.TrainStep(variant)
        assert code_and_reason(caught.value) == (grpc.StatusCode.FAILED_PRECONDITION, "STEP_OUT_OF_ORDER")
        from grpc_status import rpc_status
        from google.rpc import error_details_pb2
        info = error_details_pb2.ErrorInfo()
        assert rpc_status.from_call(caught.value).details[0].Unpack(info)
        assert dict(info.metadata) == {"optimizer_id": "opt", "expected": "0", "got": "1"}
    unchanged(before, state(pb2, stub, sid))


def test_a_retried_step_answers_its_count_and_applies_nothing(pb, stub):
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, 6)
    assert stub.TrainStep(request).steps == 1  # gradients for the Steps
    step = pb2.StepRequest(session_id=sid, optimizer_id="opt", expected_step=1)
    assert stub.Step(step).steps == 2
    before = state(pb2, stub, sid)
    assert stub.Step(step).steps == 2
    assert stub.Step(step, metadata=((AFTER, "1"),)).steps == 2
    unchanged(before, state(pb2, stub, sid))
    # A TrainStep numbered 1 is not that Step.
    fails(lambda: stub.TrainStep(numbered(request, 1)),
          grpc.StatusCode.FAILED_PRECONDITION, "STEP_OUT_OF_ORDER", '"opt"')
    assert stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="opt", expected_step=2)).steps == 3


@WIDTHS
def test_a_retry_sent_while_the_first_attempt_waits_gets_the_same_answer(pb, stub, inputs):
    """Two copies of one numbered TrainStep wait for their turn (a client that timed out and
    retried while the first attempt was still queued): one is applied, both get its answer."""
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, inputs)
    assert stub.TrainStep(request).steps == 1  # gradients for the Step below
    first = stub.TrainStep.future(numbered(request, 2))
    time.sleep(0.2)
    second = stub.TrainStep.future(numbered(request, 2))
    time.sleep(0.2)
    assert not first.done() and not second.done()
    assert stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="opt")).steps == 2
    a, b = first.result(timeout=30), second.result(timeout=30)
    assert a.steps == 3
    same_answer(a, b, pb2)
    assert stub.TrainStep(request).steps == 4


def test_field_and_header_must_agree(pb, stub):
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, 6)
    fails(lambda: stub.TrainStep(numbered(request, 0), metadata=((AFTER, "1"),)),
          grpc.StatusCode.INVALID_ARGUMENT, "INVALID_HEADER", "expected_step")
    fails(lambda: stub.Step(pb2.StepRequest(session_id=sid, optimizer_id="opt", expected_step=3),
                            metadata=((AFTER, "0"),)),
          grpc.StatusCode.INVALID_ARGUMENT, "INVALID_HEADER", "expected_step")
    assert stub.TrainStep(numbered(request, 0), metadata=((AFTER, "0"),)).steps == 1

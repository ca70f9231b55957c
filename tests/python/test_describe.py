"""DescribeSession through a plain grpcio client: layers, optimizers with their counts, bytes
and the replica (--replica-id, default the host name)."""
import socket
import uuid

import grpc
import numpy as np

from layerd_server import Server
from test_training_step import fails, sgd_session, two_layer


def test_describe_session_names_what_the_session_holds(pb, stub):
    pb2, _ = pb
    sid, request = sgd_session(pb2, stub, 6)
    two_layer(pb2, stub, sid, np.float32, layer="other")
    stub.CreateLayer(pb2.CreateLayerRequest(session_id=sid, layer_id="act", kind="relu"))
    for n in range(3):
        stub.TrainStep(request)
    d = stub.DescribeSession(pb2.DescribeSessionRequest(session_id=sid))
    assert d.session_id == sid and d.idle_timeout_seconds == 300
    assert [(l.layer_id, l.kind, l.dtype, l.optimizer_id) for l in d.layers] == [
        ("act", "relu", pb2.DTYPE_UNSPECIFIED, ""),
        ("net", "sequential", pb2.DTYPE_FLOAT64, "opt"),
        ("other", "sequential", pb2.DTYPE_FLOAT32, "")]
    assert [(o.optimizer_id, o.algorithm, o.steps, list(o.layer_ids)) for o in d.optimizers] == [
        ("opt", "sgd", 3, ["net"])]
    # net: 6x5 + 5 + 5x3 + 3 = 53 float64 parameters and gradients; other: the same in float32.
    assert d.held_bytes >= 53 * 8 * 2 + 53 * 4 * 2
    assert d.replica_id == socket.gethostname()
    fails(lambda: stub.DescribeSession(pb2.DescribeSessionRequest(session_id=uuid.uuid4().hex)),
          grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


def test_replica_id_is_what_the_flag_says(pb):
    pb2, pb2_grpc = pb
    server = Server("--replica-id", "layerd-7")
    try:
        with grpc.insecure_channel(server.addr) as channel:
            stub = pb2_grpc.LayerServiceStub(channel)
            sid = stub.CreateSession(pb2.CreateSessionRequest()).session_id
            assert stub.DescribeSession(pb2.DescribeSessionRequest(session_id=sid)).replica_id == "layerd-7"
    finally:
        assert server.stop() == 0

"""Fixtures: the layerd.v1 stubs compiled from the repo's proto with grpcio-tools,
and a real layerd server process on a loopback port."""
import sys
import tempfile
from pathlib import Path

import pytest

from layerd_server import REPO, Server

PROTO = REPO / "proto" / "layerd" / "v1" / "layerd.proto"


def compile_proto():
    """layerd_pb2 and layerd_pb2_grpc, as a new user would generate them."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="layerd-py-")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO)])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out)
    import layerd_pb2
    import layerd_pb2_grpc
    return layerd_pb2, layerd_pb2_grpc


@pytest.fixture(scope="session")
def pb():
    return compile_proto()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    assert s.stop() == 0, "layerd exits 0 on SIGTERM"


@pytest.fixture(scope="module")
def stub(pb, server):
    pb2, pb2_grpc = pb
    with server.channel() as channel:
        yield pb2_grpc.LayerServiceStub(channel)

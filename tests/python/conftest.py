"""Fixtures: the layerd.v1 stubs compiled from the repo's proto with grpcio-tools,
and a real layerd server process on a loopback port."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto" / "layerd" / "v1" / "layerd.proto"
BINARY = Path(os.environ.get("LAYERD_BIN", REPO / "target" / "debug" / "layerd"))
MAX_MESSAGE = 256 << 20


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


class Server:
    """A layerd process started with extra flags; its address read from its log."""

    def __init__(self, *flags):
        assert BINARY.exists(), f"{BINARY} not built (cargo build)"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERD_")}
        self.proc = subprocess.Popen(
            [str(BINARY), "--addr", "127.0.0.1:0", "--log-format", "json", *flags],
            stderr=subprocess.PIPE, text=True, env=env)
        self.addr = None
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            event = json.loads(line)
            if event.get("message") == "layerd serving":
                self.addr = event["addr"]
                break
        assert self.addr, "layerd did not start:\n" + "".join(self.log)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def channel(self):
        return grpc.insecure_channel(self.addr, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE)])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


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

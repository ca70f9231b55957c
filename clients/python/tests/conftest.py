"""Fixtures: a real layerd server (the repo's binary) and a layerd.Client for it."""
import sys
from pathlib import Path

import pytest

# The server launcher and the numpy reference layers are shared with the
# repo's protocol-level suite in tests/python.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "python"))

import layerd  # noqa: E402
from layerd_server import Server  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    assert s.stop() == 0


@pytest.fixture
def client(server):
    with layerd.Client(server.addr, max_message_bytes=128 << 20) as c:
        yield c

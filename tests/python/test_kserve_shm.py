"""Triton's system shared-memory extension, through tritonclient's own client and
`tritonclient.utils.shared_memory` (the flow of Triton's simple_grpc_shm_client.py):
registration, stateless and sequence inference with inputs and outputs in regions
(bit-identical to the messages' path), the error cases with their codes, names per
principal, a region that shrinks under the server, and a randomized sweep of offsets
and sizes after which the server still answers.
"""
import os
import random
import uuid

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from layerd_server import Server
from reference import Relu
from test_numpy_conformance import sample

TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}


@pytest.fixture(scope="module")
def shm_server():
    s = Server("--allow-client-shm", "--max-shm-regions", "16")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(shm_server):
    c = tc.InferenceServerClient(shm_server.addr)
    yield c
    c.unregister_system_shared_memory()
    c.close()


class Region:
    """A POSIX shared-memory object under /dev/shm, registered as `name`; removed on exit."""

    def __init__(self, client, size, name=None, register=True, headers=None):
        self.client, self.size = client, size
        self.name = name or f"r{uuid.uuid4().hex[:8]}"
        self.key = f"/layerd-test-{os.getpid()}-{self.name}"
        self.handle = shm.create_shared_memory_region(self.name, self.key, size)
        self.headers = headers
        if register:
            client.register_system_shared_memory(self.name, self.key, size, headers=headers)

    def put(self, a, offset=0):
        shm.set_shared_memory_region(self.handle, [a], offset=offset)

    def get(self, dtype, shape, offset=0):
        return shm.get_contents_as_numpy(self.handle, dtype, shape, offset=offset).copy()

    @property
    def path(self):
        return f"/dev/shm{self.key}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.client.unregister_system_shared_memory(self.name, headers=self.headers)
        except InferenceServerException:
            pass
        try:
            shm.destroy_shared_memory_region(self.handle)
        except FileNotFoundError:  # a test removed the object itself
            pass


def shm_input(name, a, region, offset=0):
    i = tc.InferInput(name, list(a.shape), TYPES[a.dtype])
    i.set_shared_memory(region.name, a.nbytes, offset=offset)
    return i


def shm_output(name, region, size, offset=0):
    o = tc.InferRequestedOutput(name)
    o.set_shared_memory(region.name, size, offset=offset)
    return o


def failure(call):
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_disabled_by_default():
    server = Server()
    try:
        client = tc.InferenceServerClient(server.addr)
        assert "system_shared_memory" not in client.get_server_metadata().extensions
        with Region(client, 64, register=False) as region:
            code, message = failure(
                lambda: client.register_system_shared_memory(region.name, region.key, 64))
            assert code == "StatusCode.FAILED_PRECONDITION" and "--allow-client-shm" in message
            x = np.ones(4, np.float32)
            code, message = failure(
                lambda: client.infer("relu", [shm_input("x", x, region)]))
            assert code == "StatusCode.FAILED_PRECONDITION" and "--allow-client-shm" in message
        client.close()
    finally:
        assert server.stop() == 0


def test_register_status_unregister(client):
    assert "system_shared_memory" in client.get_server_metadata().extensions
    with Region(client, 4096) as a, Region(client, 256, register=False) as b:
        client.register_system_shared_memory(b.name, b.key, 128, offset=64)
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert status[a.name] == {"name": a.name, "key": a.key, "byte_size": "4096"}
        assert status[b.name]["offset"] == "64" and status[b.name]["byte_size"] == "128"
        one = client.get_system_shared_memory_status(b.name, as_json=True)["regions"]
        assert list(one) == [b.name]
        client.unregister_system_shared_memory(b.name)
        assert b.name not in client.get_system_shared_memory_status(as_json=True).get("regions", {})
        code, message = failure(lambda: client.get_system_shared_memory_status(b.name))
        assert code == "StatusCode.NOT_FOUND" and b.name in message


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("model", ["relu", "relu_no_grad", "sigmoid_no_grad", "identity"])
def test_stateless_inference_through_regions_matches_the_messages(client, model, dtype):
    x = sample((16, 1000), dtype, seed=3)
    with Region(client, 3 * x.nbytes) as inputs, Region(client, 2 * x.nbytes) as outputs:
        inputs.put(x, offset=x.nbytes)          # an offset inside the region
        result = client.infer(model, [shm_input("x", x, inputs, offset=x.nbytes)],
                              outputs=[shm_output("y", outputs, x.nbytes, offset=x.nbytes)])
        out = result.get_output("y")
        assert out.datatype == TYPES[np.dtype(dtype)] and list(out.shape) == list(x.shape)
        assert result.get_response().raw_output_contents == [b""], "the bytes are in the region"
        y = outputs.get(dtype, x.shape, offset=x.nbytes)
        plain = tc.InferInput("x", list(x.shape), TYPES[np.dtype(dtype)])
        plain.set_data_from_numpy(x)
        want = client.infer(model, [plain]).as_numpy("y")
        assert y.tobytes() == want.tobytes()
        assert not outputs.get(dtype, x.shape).any(), "nothing written before the offset"
        # Mixed: input in a region, output in the response, and the other way round.
        y2 = client.infer(model, [shm_input("x", x, inputs, offset=x.nbytes)]).as_numpy("y")
        assert y2.tobytes() == want.tobytes()
        client.infer(model, [plain], outputs=[shm_output("y", outputs, x.nbytes)])
        assert outputs.get(dtype, x.shape).tobytes() == want.tobytes()


@pytest.mark.parametrize("kind", ["relu", "sigmoid", "identity"])
def test_a_sequence_runs_forward_and_backward_through_regions(client, kind):
    x, dout = sample((8, 512), np.float32, seed=4), sample((8, 512), np.float32, seed=5)
    n = x.nbytes
    seq = 7100 + ["relu", "sigmoid", "identity"].index(kind) * 2
    with Region(client, 2 * n) as inputs, Region(client, 2 * n) as outputs:
        inputs.put(x)
        inputs.put(dout, offset=n)
        client.infer(kind, [shm_input("x", x, inputs)], outputs=[shm_output("y", outputs, n)],
                     sequence_id=seq, sequence_start=True)
        client.infer(f"{kind}_backward", [shm_input("dout", dout, inputs, offset=n)],
                     outputs=[shm_output("dx", outputs, n, offset=n)], sequence_id=seq,
                     sequence_end=True)
        y, dx = outputs.get(np.float32, x.shape), outputs.get(np.float32, x.shape, offset=n)
    # The same sequence with the tensors in the messages: the same bits.
    want_y = client.infer(kind, [plain(x)], sequence_id=seq + 1, sequence_start=True).as_numpy("y")
    d = plain(dout, "dout")
    want_dx = client.infer(f"{kind}_backward", [d], sequence_id=seq + 1,
                           sequence_end=True).as_numpy("dx")
    assert y.tobytes() == want_y.tobytes() and dx.tobytes() == want_dx.tobytes()
    if kind == "relu":
        reference = Relu()
        assert y.tobytes() == reference.forward(x).tobytes()
        assert dx.tobytes() == reference.backward(dout).tobytes(), "and bit-identical to numpy"


def raw_request(model, x, region=None, offset=None, byte_size=None, raw=True, output=None):
    """A request tritonclient's high-level client would refuse to build."""
    i = tpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))
    for key, value in [("shared_memory_region", region), ("shared_memory_offset", offset),
                       ("shared_memory_byte_size", byte_size)]:
        if value is not None:
            if isinstance(value, str):
                i.parameters[key].string_param = value
            else:
                i.parameters[key].int64_param = value
    r = tpb.ModelInferRequest(model_name=model, inputs=[i],
                              raw_input_contents=[x.tobytes()] if raw else [])
    if output is not None:
        o = r.outputs.add(name="y")
        o.parameters["shared_memory_region"].string_param = output[0]
        o.parameters["shared_memory_byte_size"].int64_param = output[1]
    return r


def test_errors_name_the_field_or_region(client, shm_server):
    import grpc
    x = np.arange(-8, 8, dtype=np.float32)
    with grpc.insecure_channel(shm_server.addr) as channel, Region(client, 256) as region:
        stub = tpb_grpc.GRPCInferenceServiceStub(channel)
        region.put(x)

        def fails(request, code, *words):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)
            assert caught.value.code().name == code, caught.value.details()
            for word in words:
                assert word in caught.value.details(), caught.value.details()

        n = x.nbytes
        fails(raw_request("relu", x, "nope", byte_size=n, raw=False), "NOT_FOUND", '"nope"',
              "shared_memory_region")
        fails(raw_request("relu", x, region.name, offset=256 - n + 4, byte_size=n, raw=False),
              "INVALID_ARGUMENT", "shared_memory_byte_size", "256 bytes")
        fails(raw_request("relu", x, region.name, byte_size=n), "INVALID_ARGUMENT",
              "raw_input_contents", region.name)
        fails(raw_request("relu", x, region.name, raw=False), "INVALID_ARGUMENT",
              "inputs[0].parameters.shared_memory_byte_size")
        fails(raw_request("relu", x, byte_size=n), "INVALID_ARGUMENT",
              "inputs[0].parameters.shared_memory_byte_size", "shared_memory_region")
        fails(raw_request("relu", x, region.name, byte_size=n - 4, raw=False), "INVALID_ARGUMENT",
              "shared_memory_byte_size", f"{n} bytes")
        fails(raw_request("relu", x, region.name, offset=-4, byte_size=n, raw=False),
              "INVALID_ARGUMENT", "shared_memory_offset")
        fails(raw_request("relu", x, output=(region.name, n - 1)), "INVALID_ARGUMENT",
              "outputs[0].parameters.shared_memory_byte_size", f"at least {n} bytes")
        fails(raw_request("relu", x, output=("nope", n)), "NOT_FOUND", "outputs[0]")
        # Typed contents and a region.
        both = raw_request("relu", x, region.name, byte_size=n, raw=False)
        both.inputs[0].contents.fp32_contents.extend(x.tolist())
        fails(both, "INVALID_ARGUMENT", "fp32_contents")
        # A failed sequence request leaves no session behind.
        start = raw_request("relu", x, region.name, byte_size=n, raw=False, output=("nope", n))
        start.parameters["sequence_id"].int64_param = 7200
        start.parameters["sequence_start"].bool_param = True
        fails(start, "NOT_FOUND", "nope")
        start.outputs[0].parameters["shared_memory_region"].string_param = region.name
        stub.ModelInfer(start)  # the same sequence starts: nothing was left of the failed one

    # Registration errors.
    with Region(client, 64, register=False) as r:
        for args, code, word in [
            ((r.name, "/no-such-layerd-object", 8), "INVALID_ARGUMENT", "key"),
            ((r.name, "/../../etc/passwd", 8), "INVALID_ARGUMENT", "key"),
            ((r.name, r.key, 65), "INVALID_ARGUMENT", "byte_size"),
            ((r.name, r.key, 0), "INVALID_ARGUMENT", "byte_size"),
            (("", r.key, 8), "INVALID_ARGUMENT", "name"),
        ]:
            got, message = failure(lambda: client.register_system_shared_memory(*args))
            assert got == f"StatusCode.{code}" and word in message, message
        client.register_system_shared_memory(r.name, r.key, 64)
        got, message = failure(lambda: client.register_system_shared_memory(r.name, r.key, 8))
        assert got == "StatusCode.ALREADY_EXISTS" and r.name in message
    code, message = failure(lambda: client.unregister_system_shared_memory("never-registered"))
    assert code == "StatusCode.NOT_FOUND" and "never-registered" in message


def test_the_region_limit_is_server_wide():
    server = Server("--allow-client-shm", "--max-shm-regions", "2")
    try:
        client = tc.InferenceServerClient(server.addr)
        with Region(client, 64), Region(client, 64), Region(client, 64, register=False) as third:
            code, message = failure(
                lambda: client.register_system_shared_memory(third.name, third.key, 64))
            assert code == "StatusCode.RESOURCE_EXHAUSTED" and "--max-shm-regions" in message
        client.close()
    finally:
        assert server.stop() == 0


def test_region_names_are_per_principal(tmp_path):
    alice, bob = "alice-token-0123456789", "bob-token-0123456789ab"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{alice} alice\n{bob} bob\n")
    server = Server("--allow-client-shm", "--auth-tokens", str(tokens))
    try:
        client = tc.InferenceServerClient(server.addr)
        as_alice = {"authorization": f"Bearer {alice}"}
        as_bob = {"authorization": f"Bearer {bob}"}
        x = np.arange(-4, 4, dtype=np.float32)
        with Region(client, 64, name="shared-name", headers=as_alice) as mine:
            mine.put(x)
            assert client.get_system_shared_memory_status(headers=as_bob, as_json=True) == {}
            code, _ = failure(lambda: client.infer("relu", [shm_input("x", x, mine)],
                                                   headers=as_bob))
            assert code == "StatusCode.NOT_FOUND", "bob cannot use alice's region"
            y = client.infer("relu", [shm_input("x", x, mine)], headers=as_alice).as_numpy("y")
            assert y.tolist() == np.maximum(x, 0).tolist()
            code, _ = failure(lambda: client.register_system_shared_memory(
                mine.name, mine.key, 64, headers=as_alice))
            assert code == "StatusCode.ALREADY_EXISTS"
            # Bob may use the same name for his own region.
            with Region(client, 64, name="shared-name", headers=as_bob):
                pass
        client.close()
    finally:
        assert server.stop() == 0


def test_a_region_that_shrinks_or_vanishes_is_an_error_not_a_crash(client):
    x = sample((1024,), np.float32, seed=6)
    with Region(client, x.nbytes) as region:
        region.put(x)
        os.truncate(region.path, 100)
        code, message = failure(lambda: client.infer("relu", [shm_input("x", x, region)]))
        assert code == "StatusCode.FAILED_PRECONDITION" and region.name in message
        code, message = failure(lambda: client.infer(
            "relu", [plain(x)],
            outputs=[shm_output("y", region, x.nbytes)]))
        assert code == "StatusCode.FAILED_PRECONDITION" and "shorter" in message
        assert os.path.getsize(region.path) == 100, "the server never grows an object"
        os.unlink(region.path)
        code, _ = failure(lambda: client.infer("relu", [shm_input("x", x, region)]))
        assert code == "StatusCode.FAILED_PRECONDITION"
    assert client.is_server_live()


def plain(a, name="x"):
    i = tc.InferInput(name, list(a.shape), TYPES[a.dtype])
    i.set_data_from_numpy(a)
    return i


def test_random_offsets_and_sizes_never_crash_the_server(client, shm_server):
    """Registrations and uses with offsets and sizes around every boundary (and far
    past them, and negative), objects truncated between calls: every answer is OK or
    one of the expected error codes, OK answers are right, and the server stays up."""
    import grpc
    rng = random.Random(14)
    expected = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
                "ALREADY_EXISTS"}
    seen = set()
    edges = lambda n: [0, 1, 3, 4, n - 4, n - 1, n, n + 1, n + 4, 2**31, 2**62, 2**63 - 1]
    with grpc.insecure_channel(shm_server.addr) as channel:
        stub = tpb_grpc.GRPCInferenceServiceStub(channel)
        for round_ in range(40):
            size = rng.choice([4, 64, 4096, 65536])
            with Region(client, size, register=False) as r:
                data = np.frombuffer(os.urandom(size), np.uint8)
                r.put(data)
                offset, byte_size = rng.choice(edges(size)), rng.choice(edges(size))
                try:
                    stub.SystemSharedMemoryRegister(tpb.SystemSharedMemoryRegisterRequest(
                        name=r.name, key=r.key, offset=offset, byte_size=byte_size))
                    registered = (offset, byte_size)
                    seen.add("OK")
                    assert 0 < byte_size and offset + byte_size <= size
                except grpc.RpcError as e:
                    seen.add(e.code().name)
                    assert e.code().name in expected, e.details()
                    continue
                if rng.random() < 0.3:
                    os.truncate(r.path, rng.choice([0, size // 2, size]))
                for _ in range(10):
                    use_offset = rng.choice(edges(byte_size) + [-1, -(2**63)])
                    elements = rng.choice([0, 1, byte_size // 4, byte_size // 4 + 1, 2**40])
                    x = np.zeros(min(elements, 1), np.float32)
                    request = raw_request("relu_no_grad", x, r.name, offset=use_offset,
                                          byte_size=elements * 4, raw=False)
                    request.inputs[0].shape[:] = [elements]
                    if rng.random() < 0.5:
                        request.outputs.add(name="y")
                        out = request.outputs[0].parameters
                        out["shared_memory_region"].string_param = r.name
                        out["shared_memory_offset"].int64_param = rng.choice(edges(byte_size))
                        out["shared_memory_byte_size"].int64_param = rng.choice(edges(byte_size))
                    try:
                        response = stub.ModelInfer(request)
                        seen.add("OK")
                        got = response.outputs[0]
                        assert list(got.shape) == [elements]
                        start = registered[0] + max(use_offset, 0)
                        xs = np.frombuffer(open(r.path, "rb").read()[start:start + 4 * elements],
                                           np.float32) if not request.outputs else None
                        if xs is not None and len(xs) == elements:
                            y = np.frombuffer(response.raw_output_contents[0], np.float32)
                            assert y.tobytes() == Relu().forward(xs.copy()).tobytes()
                    except grpc.RpcError as e:
                        seen.add(e.code().name)
                        assert e.code().name in expected, (e.code(), e.details())
        assert client.is_server_live() and client.is_server_ready()
    assert {"OK", "INVALID_ARGUMENT"} <= seen, seen

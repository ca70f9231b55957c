"""TLS, mutual TLS and the retry policy, against real servers: certificates made here with
trustme; overload to retry through (the README's recipe for a lost server runs in
tests/python/test_readme.py)."""
import threading
import time

import grpc
import numpy as np
import pytest
import trustme

import layerd
from layerd_server import Server

X = np.array([1.5, -2.0, 0.0, 3.0], dtype=np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, as files."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(d / "server.pem")
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(d / "server.pem", append=True)
    server.private_key_pem.write_to_path(d / "server.key")
    client = ca.issue_cert("client.layerd.test")
    client.cert_chain_pems[0].write_to_path(d / "client.pem")
    client.private_key_pem.write_to_path(d / "client.key")
    trustme.CA().cert_pem.write_to_path(d / "other-ca.pem")
    return d


def roundtrip(client):
    with client.session() as s:
        relu = s.layer("relu")
        assert relu.forward(X).tolist() == [1.5, 0.0, 0.0, 3.0]
        return relu.backward(np.ones(4, np.float32)).tolist()


@pytest.fixture(scope="module")
def tls_server(pki):
    s = Server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def mtls_server(pki):
    s = Server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
               "--tls-client-ca", str(pki / "ca.pem"))
    yield s
    assert s.stop() == 0


def test_tls_with_a_ca_file_keeps_the_message_size_options(pki, tls_server):
    port = tls_server.addr.rsplit(":", 1)[1]
    with layerd.Client(f"localhost:{port}", root_certificates=pki / "ca.pem") as client:
        assert roundtrip(client) == [1.0, 0.0, 0.0, 1.0]
        # 6 Mi float32 elements (24 MiB) each way: over grpcio's 4 MiB default receive limit,
        # so this passes only if the TLS channel kept the client's 64 MiB options.
        big = np.linspace(-1, 1, 6 << 20, dtype=np.float32)
        with client.session() as s:
            assert np.array_equal(s.layer("relu").forward(big), np.maximum(big, 0))
    # PEM bytes work as well as a path; server_name checks another name than the target's host.
    with layerd.Client(tls_server.addr, root_certificates=(pki / "ca.pem").read_bytes(),
                       server_name="localhost") as client:
        assert roundtrip(client) == [1.0, 0.0, 0.0, 1.0]
    # One ready credentials object.
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with layerd.Client(f"localhost:{port}", credentials=credentials) as client:
        assert client.kinds()["relu"]


def test_tls_refuses_another_ca_and_plaintext(pki, tls_server):
    port = tls_server.addr.rsplit(":", 1)[1]
    no_retry = layerd.Retry(attempts=1)
    with layerd.Client(f"localhost:{port}", root_certificates=pki / "other-ca.pem", timeout=5,
                       retry=no_retry) as client:
        with pytest.raises(layerd.Unavailable):
            client.kinds()
    with layerd.Client(tls_server.addr, timeout=5, retry=no_retry) as client:  # plaintext
        with pytest.raises(layerd.LayerdError):
            client.kinds()


def test_mutual_tls(pki, mtls_server):
    port = mtls_server.addr.rsplit(":", 1)[1]
    target = f"localhost:{port}"
    with layerd.Client(target, root_certificates=pki / "ca.pem", private_key=pki / "client.key",
                       certificate_chain=pki / "client.pem") as client:
        assert roundtrip(client) == [1.0, 0.0, 0.0, 1.0]
    # No client certificate: the handshake is refused.
    with layerd.Client(target, root_certificates=pki / "ca.pem", timeout=5,
                       retry=layerd.Retry(attempts=1)) as client:
        with pytest.raises(layerd.Unavailable):
            client.kinds()
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        layerd.Client(target, root_certificates=pki / "ca.pem", private_key=pki / "client.key")


def test_overloaded_calls_are_retried_with_backoff_until_they_run():
    server = Server("--max-concurrent-calls", "1")
    try:
        channel = server.channel()
        from layerd.v1 import layerd_pb2_grpc
        stub = layerd_pb2_grpc.LayerServiceStub(channel)
        release = threading.Event()

        def hold():  # an open Run stream holds the server's one call slot
            yield from ()
            release.wait(10)

        holder = stub.Run(hold())
        time.sleep(0.3)
        with layerd.Client(server.addr, retry=layerd.Retry(attempts=1)) as client:
            with pytest.raises(layerd.Unavailable) as shed:
                client.kinds()
            assert shed.value.reason == "OVERLOADED"
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        with layerd.Client(server.addr, retry=layerd.Retry(attempts=10, initial_backoff=0.1, max_backoff=0.4)) as client:
            assert "relu" in client.kinds()  # shed, backed off, retried, served
        assert time.monotonic() - started >= 0.3
        list(holder)
        channel.close()
    finally:
        assert server.stop() == 0

"""Exactly-once steps from the client's side: a TrainStep whose answer is lost with its
connection (a real TCP proxy cuts it after the server answered) is retried by the client, and
the retry answers the first answer without applying the step twice."""
import socket
import threading

import numpy as np
import pytest

import layerd


class CuttingProxy:
    """A TCP proxy to `target`. Once `arm()`ed, the first answer from the server longer than
    `threshold` bytes is cut: its rest is dropped and both sides of the connection are closed,
    so the client loses an answer the server has already computed and committed."""

    def __init__(self, target, threshold):
        self.target, self.threshold = target, threshold
        self.armed, self.cuts = threading.Event(), 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self):
        self.armed.set()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source, sink, answers):
        seen = 0
        try:
            while data := source.recv(1 << 16):
                if answers and self.armed.is_set():
                    seen += len(data)
                    if seen > self.threshold:
                        self.armed.clear()
                        self.cuts += 1
                        raise ConnectionAbortedError
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def network(rng):
    members = [("fc1", "affine", {"in_features": 1000, "out_features": 20}), ("relu", "relu"),
               ("fc2", "affine", {"in_features": 20, "out_features": 3}), ("loss", "softmax_with_loss")]
    params = {"fc1.W": rng.standard_normal((1000, 20)) * 0.05, "fc1.b": np.zeros(20),
              "fc2.W": rng.standard_normal((20, 3)) * 0.5, "fc2.b": np.zeros(3)}
    return members, params


def test_a_step_whose_answer_was_lost_is_retried_and_applied_once(server):
    rng = np.random.default_rng(5)
    members, params = network(rng)
    batches = [(rng.standard_normal((64, 1000)), rng.integers(0, 3, 64)) for _ in range(4)]
    proxy = CuttingProxy(server.addr, threshold=100_000)  # dx: 64 x 1000 float64 = 512 KB
    retry = layerd.Retry(initial_backoff=0.05)
    try:
        with layerd.Client(proxy.addr, retry=retry) as cut, layerd.Client(server.addr) as plain:
            with cut.session() as a, plain.session() as b:
                net_a, net_b = a.sequential(members, params=params), b.sequential(members, params=params)
                opt_a, opt_b = a.optimizer("adam", lr=0.01), b.optimizer("adam", lr=0.01)
                for k, (x, t) in enumerate(batches):
                    if k == 2:
                        proxy.arm()
                    loss_a, dx_a = net_a.train_step(x, t, opt_a, return_dx=True)
                    loss_b, dx_b = net_b.train_step(x, t, opt_b, return_dx=True)
                    assert loss_a == loss_b and np.array_equal(dx_a, dx_b), k
                    assert opt_a.steps == opt_b.steps == k + 1
                assert proxy.cuts == 1
                for name, value in net_b.params().items():
                    assert np.array_equal(net_a.params()[name], value), name
                # The count on the server agrees: the next Step follows update 4.
                net_a.forward(batches[0][0], t=batches[0][1])
                net_a.backward()
                assert opt_a.step() == 5
    finally:
        proxy.close()


def test_describe_gives_layers_optimizers_counts_and_bytes(client):
    rng = np.random.default_rng(2)
    members, params = network(rng)
    with client.session(idle_timeout=120) as s:
        net = s.sequential(members, params=params, layer_id="net")
        s.layer("relu", layer_id="act")
        opt = s.optimizer("momentum", lr=0.1, optimizer_id="mom")
        x, t = rng.standard_normal((8, 1000)), rng.integers(0, 3, 8)
        for _ in range(2):
            net.train_step(x, t, opt)
        d = s.describe()
        assert d["layers"] == {"act": {"kind": "relu", "dtype": None, "optimizer": None},
                               "net": {"kind": "sequential", "dtype": np.dtype(np.float64), "optimizer": "mom"}}
        assert d["optimizers"] == {"mom": {"algorithm": "momentum", "steps": 2, "layers": ["net"],
                                           "stored_steps": None}}  # no session store
        assert d["idle_timeout"] == 120 and d["replica_id"]
        # Parameters, gradients and momentum (3 copies of 20,083 float64) and the kept state.
        assert d["held_bytes"] > 3 * 20_083 * 8
        # A second handle resumes at the server's count, and numbers its steps from there.
        again = s.get_optimizer("mom")
        assert (again.algorithm, again.steps) == ("momentum", 2)
        net.train_step(x, t, again)
        with pytest.raises(layerd.FailedPrecondition) as caught:
            net.train_step(x[:4], t[:4], opt)  # this handle's count (2) is stale now
        assert caught.value.reason == "STEP_OUT_OF_ORDER" and caught.value.metadata["got"] == "3"
        with pytest.raises(layerd.NotFound) as caught:
            s.get_optimizer("adam")
        assert caught.value.reason == "OPTIMIZER_NOT_FOUND"

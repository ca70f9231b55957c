"""Sessions that outlive their replica (--session-store): real Redis, real nginx, real layerd
processes and the project's Python client.

- Three replicas behind nginx (deploy/nginx's configuration, hashing x-session-id), eight
  clients training through it (MLPs and convnets with Adam, dropout and batch_norm): with the replica holding most sessions
  SIGKILLed mid-run, with a rolling restart of all three, with Redis (AOF on) restarted, and
  with nginx spreading calls round-robin (every call a handover): every client finishes, and
  every final parameter and loss is bit-identical to the same training on a server without a
  store (sync mode: no step replayed by the client).
- SIGSTOP of a holder: another replica takes the session over; the old holder, resumed, commits
  nothing (its write is fenced: UNAVAILABLE SESSION_MOVED) and the stored state never goes back.
- Bad store contents (garbage state, another principal's key renamed): DATA_LOSS SESSION_LOST,
  no crash, nothing served to the wrong principal.
"""
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import layerd
from cluster import Proxy, free_port
from layerd_server import Server
from redis_store import Redis, RedisCluster, held, replica, wait_until

MEMBERS = [("fc1", "affine", {"in_features": 20, "out_features": 16, "seed": 1}), ("relu", "relu"),
           ("drop", "dropout", {"ratio": 0.2, "seed": 5}),
           ("fc2", "affine", {"in_features": 16, "out_features": 4, "seed": 2}), ("loss", "softmax_with_loss")]
#: A convnet with batch_norm (its running statistics are buffers the store must keep too).
CONVNET = [("conv", "convolution", {"in_channels": 1, "out_channels": 4, "kernel_h": 3, "kernel_w": 3, "pad": 1,
                                    "seed": 1}),
           ("bn", "batch_norm", {"num_features": 4}), ("relu", "relu"),
           ("pool", "pooling", {"pool_h": 2, "pool_w": 2, "stride": 2}),
           ("drop", "dropout", {"ratio": 0.2, "seed": 5}),
           ("fc", "affine", {"in_features": 4 * 4 * 4, "out_features": 4, "seed": 2}), ("loss", "softmax_with_loss")]
STEPS = 60
#: The clients of the fleet tests: even seeds train the MLP, odd ones the convnet.
CLIENTS = 8


def network(seed):
    return CONVNET if seed % 2 else MEMBERS


def batches(seed):
    rng = np.random.default_rng(seed)
    shape = (16, 1, 8, 8) if seed % 2 else (16, 20)
    return [(rng.standard_normal(shape), rng.integers(0, 4, 16)) for _ in range(STEPS)]


#: The Python client README's training loop that resumes after a crash in async mode.
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
RESUME_LOOP = re.search(r"```python\n(losses, k = .*?)```", README, re.S).group(1)


def train(client, seed, pause=None, session_id=None, resumed=None):
    """Trains one network (float64, Adam) for STEPS steps; answers its losses and final params.
    `pause(step)` runs before each step. With `resumed` (a list), the loop is the README's: a
    step refused with STEP_OUT_OF_ORDER (the session came back behind, after a crash in async
    mode) resumes from the count the error gives; `resumed` collects how far each went back."""
    data = batches(seed)
    with client.session(session_id=session_id) as s:
        net = s.sequential(network(seed), layer_id="net", dtype=np.float64)
        opt = s.optimizer("adam", lr=0.01, optimizer_id="adam")
        if resumed is None:
            losses = []
            for k, batch in enumerate(data):
                if pause:
                    pause(k)
                losses.append(net.train_step(*batch, opt))
        else:
            class Batches(list):  # the README's loop, with the test's pause and its count of resumptions
                def __getitem__(self, k):
                    if pause:
                        pause(k)
                    return list.__getitem__(self, k)

            class Opt:
                def __init__(self, opt):
                    object.__setattr__(self, "opt", opt)

                def __getattr__(self, name):
                    return getattr(self.opt, name)

                def __setattr__(self, name, value):
                    if name == "steps" and value <= self.opt.steps:  # a resumption, not a step
                        resumed.append(self.opt.steps - value)
                    setattr(self.opt, name, value)

            namespace = {"batches": Batches(data), "net": net, "opt": Opt(opt), "layerd": layerd}
            exec(RESUME_LOOP, namespace)
            losses = namespace["losses"]
        assert opt.steps == STEPS
        return losses, {**net.params(), **{f"buffer {k}": v for k, v in net.buffers().items()}}


@pytest.fixture
def redis():
    r = Redis.start_or_skip()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def reference():
    """The same training on a server without a session store."""
    server = Server()
    try:
        with layerd.Client(server.addr) as client:
            yield {seed: train(client, seed) for seed in range(CLIENTS)}
    finally:
        server.stop()


def same(got, want):
    assert got[0] == want[0], "losses"
    for name, value in want[1].items():
        assert np.array_equal(got[1][name], value), name


class Fleet:
    """Three replicas on one Redis behind nginx (deploy/nginx's configuration; `hashing` False
    takes its `hash` line out, so nginx spreads each client's calls round-robin)."""

    def __init__(self, redis, hashing=True, flags=(), slots=3):
        self.redis, self.flags = redis, flags
        self.replicas = [replica(redis, f"r{i}", *flags) for i in range(3)]
        self.addrs = [r.addr for r in self.replicas] + [f"127.0.0.1:{free_port()}" for _ in range(slots - 3)]
        self.proxy = Proxy.start_or_skip("nginx", self.addrs, hashing=hashing)

    def start(self, i):
        """Starts replica i on its address (nginx lists it already)."""
        assert i == len(self.replicas)
        self.replicas.append(replica(self.redis, f"r{i}", *self.flags, addr=self.addrs[i]))

    def restart(self, i):
        """Stops replica i (SIGTERM: its drain hands its sessions over) and starts it again on
        the same address with the same replica id."""
        assert self.replicas[i].stop() == 0
        self.replicas[i] = replica(self.redis, f"r{i}", *self.flags, addr=self.addrs[i])

    def kill_the_busiest(self):
        """SIGKILLs the replica holding most sessions, with calls in flight; answers its index
        and how many it held."""
        counts = [held(r) for r in self.replicas]
        victim = max(range(len(counts)), key=lambda i: counts[i])
        time.sleep(0.05)
        self.replicas[victim].proc.kill()
        self.replicas[victim].proc.wait()
        return victim, counts[victim]

    def stop(self):
        self.proxy.stop()
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.kill()


def train_through(fleet, reference, disrupt, clients=CLIENTS, resumed=None):
    """`clients` trainings through the fleet's proxy; `disrupt(fleet)` runs once every client is
    past step 20, while they go on. Every client must finish bit-identical to `reference`."""
    results, errors = {}, []
    started = threading.Barrier(clients + 1)

    def client(seed):
        paused = []

        def pause(k):  # once: a client that resumed from behind step 20 passes it again
            if k == 20 and not paused:
                paused.append(k)
                started.wait(timeout=60)

        try:
            with layerd.Client(fleet.proxy.addr, retry=layerd.Retry(attempts=12, initial_backoff=0.1)) as c:
                results[seed] = train(c, seed, pause, resumed=resumed)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            started.abort()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    outcome = disrupt(fleet)
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert sorted(results) == list(range(clients))
    for seed, result in results.items():
        same(result, reference[seed])
    assert fleet.redis.stored_keys() == []  # closed sessions leave the store, all their keys
    return outcome


def handovers(server, direction):
    return server.metrics().get(("layerd_store_handovers_total", (("direction", direction),)), 0)


@pytest.fixture
def fleet(redis):
    f = Fleet(redis)
    yield f
    f.stop()


def test_a_replica_killed_mid_run_loses_no_session_and_no_step(fleet, reference):
    victim, count = train_through(fleet, reference, Fleet.kill_the_busiest)
    assert count >= 2
    assert sum(handovers(r, "takeover") for i, r in enumerate(fleet.replicas) if i != victim) == count


def test_in_async_mode_clients_resume_from_the_stored_count_after_a_kill(redis, reference):
    fleet = Fleet(redis, flags=("--durability", "async"))
    resumed = []
    try:
        train_through(fleet, reference, Fleet.kill_the_busiest, resumed=resumed)
        assert all(back >= 0 for back in resumed), resumed  # never ahead of what was answered
    finally:
        fleet.stop()


def test_a_rolling_restart_loses_no_session_and_no_step(fleet, reference):
    def roll(fleet):
        for i in range(3):
            fleet.restart(i)

    train_through(fleet, reference, roll)


def test_scaling_three_to_five_to_two_loses_no_session_and_no_step(redis, reference):
    fleet = Fleet(redis, slots=5)
    try:
        def scale(fleet):
            fleet.start(3)
            fleet.start(4)
            time.sleep(2.5)  # nginx tries the new replicas again after fail_timeout (2 s)
            for i in (0, 1, 4):
                assert fleet.replicas[i].stop() == 0  # each drain hands its sessions over

        train_through(fleet, reference, scale)
        live = [r for r in fleet.replicas if r.proc.poll() is None]
        assert len(live) == 2
    finally:
        fleet.stop()


def test_restarting_redis_with_its_append_only_file_loses_nothing(reference):
    redis = Redis.start_or_skip(aof=True)
    fleet = Fleet(redis)
    try:
        def restart_redis(fleet):
            time.sleep(0.05)
            redis.stop()
            time.sleep(1.0)
            redis.start()

        train_through(fleet, reference, restart_redis)
        errors = sum(r.metrics().get(("layerd_store_errors_total", ()), 0) for r in fleet.replicas)
        assert errors > 0  # the store was really down under the clients' calls
    finally:
        fleet.stop()
        redis.stop()


def test_calls_spread_round_robin_over_the_replicas_still_train_bit_identically(redis, reference):
    fleet = Fleet(redis, hashing=False)
    try:
        train_through(fleet, reference, lambda fleet: None, clients=3)
        moved = sum(handovers(r, "in") for r in fleet.replicas)
        assert moved > STEPS, moved  # calls moved their sessions, many times over
    finally:
        fleet.stop()


def test_a_redis_cluster_of_three_masters_keeps_every_session(reference):
    cluster = RedisCluster.start_or_skip()
    fleet = Fleet(cluster)
    try:
        def kill_and_count(fleet):
            Fleet.kill_the_busiest(fleet)
            # The sessions were spread over the masters by their hash tags.
            return [len(n.session_keys()) for n in cluster.nodes]

        spread = train_through(fleet, reference, kill_and_count)
        assert sum(1 for count in spread if count) >= 2, spread
    finally:
        fleet.stop()
        cluster.stop()


def test_a_stopped_holder_is_fenced_and_the_store_never_goes_back(redis, reference):
    a, b = replica(redis, "a"), replica(redis, "b")
    try:
        data = batches(0)
        # No retries on a: its answer is what this test reads.
        with layerd.Client(a.addr, retry=layerd.Retry(attempts=1)) as on_a, layerd.Client(b.addr) as on_b:
            s = on_a.session(session_id="fenced")
            net = s.sequential(MEMBERS, layer_id="net", dtype=np.float64)
            opt = s.optimizer("adam", lr=0.01, optimizer_id="adam")
            for x, t in data[:5]:
                net.train_step(x, t, opt)
            a.proc.send_signal(signal.SIGSTOP)
            # b takes it over once a's heartbeat has expired, and trains on.
            started = time.monotonic()
            on_b_s = on_b.attach("fenced")
            assert time.monotonic() - started < 5
            net_b, opt_b = on_b_s.get_layer("net"), on_b_s.get_optimizer("adam")
            assert opt_b.steps == 5 and on_b_s.describe()["replica_id"] == "b"
            for x, t in data[5:10]:
                net_b.train_step(x, t, opt_b)
            a.proc.send_signal(signal.SIGCONT)
            # a still has its copy at step 5. Either its step's write is fenced (SESSION_MOVED), or
            # a learned first (b's handover request, waiting for it since the SIGSTOP, is fenced
            # too) and took the session back at step 10 (STEP_OUT_OF_ORDER, got 10): in both cases
            # nothing is committed and the answer says so.
            with pytest.raises(layerd.LayerdError) as caught:
                net.train_step(*data[5], opt)
            assert (caught.value.reason == "SESSION_MOVED"
                    or (caught.value.reason, caught.value.metadata.get("got")) == ("STEP_OUT_OF_ORDER", "10"))
            assert on_b_s.describe()["optimizers"]["adam"]["steps"] == 10
            assert on_b_s.describe()["optimizers"]["adam"]["stored_steps"] == 10  # sync: all stored
            # a asks b to hand it over, and goes on from step 10 as training without a store.
            opt.steps = 10
            for x, t in data[10:]:
                net.train_step(x, t, opt)
            assert s.describe()["replica_id"] == "a"
            for name, value in net.params().items():
                assert np.array_equal(value, reference[0][1][name]), name
            assert a.metrics().get(("layerd_store_fenced_writes_total", ()), 0) >= 1
            assert b.metrics().get(("layerd_store_handovers_total", (("direction", "out"),)), 0) >= 1
            s.close()
    finally:
        for r in (a, b):
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGCONT)
                r.stop()


def test_bad_store_contents_are_a_clear_error_and_never_another_principals(redis, tmp_path):
    """Sessions written by one replica (and released by its drain), then damaged in Redis, and
    read by a second replica: DATA_LOSS SESSION_LOST naming what is wrong, no crash."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token-0123456789 alice\nbob-token-0123456789 bob\n")
    first = replica(redis, "first", "--auth-tokens", str(tokens))
    with layerd.Client(first.addr, token="alice-token-0123456789") as alice:
        for name in ("garbage", "truncated", "renamed"):
            alice.session(session_id=name).sequential(MEMBERS, layer_id="net", dtype=np.float64)
    assert first.stop() == 0  # the drain writes and releases every session
    keys = {k.split(":")[-1].rstrip("}"): k for k in redis.session_keys()}
    assert sorted(keys) == ["garbage", "renamed", "truncated"]
    assert all(redis.cli("HGET", k, "holder") == "" for k in keys.values())
    state = lambda name: keys[name].replace("layerd:session:", "layerd:state:")  # noqa: E731
    redis.cli("SET", state("garbage"), "not a checkpoint")
    redis.cli("EVAL", "redis.call('SET', KEYS[1], string.sub(redis.call('GET', KEYS[1]), 1, 100))",
              "1", state("truncated"))
    redis.cli("RENAME", keys["renamed"], keys["renamed"].replace("616c696365", "626f62"))  # alice -> bob
    second = replica(redis, "second", "--auth-tokens", str(tokens))
    try:
        with layerd.Client(second.addr, token="alice-token-0123456789") as alice, \
                layerd.Client(second.addr, token="bob-token-0123456789") as bob:
            for name, client, words in [("garbage", alice, "state"), ("truncated", alice, "state"),
                                        ("renamed", bob, "owner")]:
                with pytest.raises(layerd.LayerdError) as caught:
                    client.attach(name)
                assert caught.value.reason == "SESSION_LOST", caught.value
                assert words in caught.value.message, caught.value.message
            # Alice's renamed session is not hers under her own key any more either.
            with pytest.raises(layerd.NotFound):
                alice.attach("renamed")
        assert second.proc.poll() is None
    finally:
        second.stop()


def forward_then_backward(first, then, relu_x):
    """On `first`: Forwards of the convnet (float64, with its target) and of a ReLU on float16
    (kept as a bitset of the half values); on `then` (the same client, or the replica the session
    moved to): their Backwards. Answers every dx and gradient."""
    x, t = batches(1)[0]
    s = first.session(session_id="kept")
    net = s.sequential(CONVNET, layer_id="net", dtype=np.float64)
    act = s.layer("relu", layer_id="act")
    net.forward(x, t)
    act.forward(relu_x)
    moved = then.attach("kept") if then is not first else s
    dx, grads = moved.get_layer("net").backward(return_grads=True)
    relu_dx = moved.get_layer("act").backward(np.full(relu_x.shape, 3.0, np.float16))
    moved.close()
    return dx, grads, relu_dx


def test_a_backward_after_a_handover_answers_as_on_the_replica_that_kept_its_forward(redis):
    """A live holder asked to let go writes what its layers kept (masks, inputs, batch statistics,
    pooling winners, the loss's scores and target): Backward on the replica that took the session
    over answers bit for bit what it would have answered on the first."""
    relu_x = np.array([1.5, -2.0, 0.0, -0.0, 65504.0], np.float16)
    server = Server()
    try:
        with layerd.Client(server.addr) as alone:
            want = forward_then_backward(alone, alone, relu_x)
    finally:
        server.stop()
    a, b = replica(redis, "a"), replica(redis, "b")
    try:
        with layerd.Client(a.addr) as on_a, layerd.Client(b.addr) as on_b:
            got = forward_then_backward(on_a, on_b, relu_x)
        assert handovers(b, "in") == 1
    finally:
        a.stop()
        b.stop()
    assert np.array_equal(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert np.array_equal(got[1][name], want[1][name]), name
    assert got[2].dtype == np.float16 and got[2].tobytes() == want[2].tobytes()
    assert redis.stored_keys() == []  # the kept state moved once, and went with the session


def test_a_backward_after_its_holder_died_asks_for_the_forward_again(redis):
    a, b = replica(redis, "a"), replica(redis, "b")
    x = np.array([1.5, -2.0, 0.5], np.float32)
    try:
        with layerd.Client(a.addr) as on_a, layerd.Client(b.addr) as on_b:
            s = on_a.session(session_id="kept")
            s.layer("relu", layer_id="act").forward(x)
            a.proc.kill()  # SIGKILL: what it kept dies with it
            a.proc.wait()
            moved = on_b.attach("kept")
            act = moved.get_layer("act")
            with pytest.raises(layerd.FailedPrecondition) as caught:
                act.backward(np.ones(3, np.float32))
            assert caught.value.reason == "KEPT_STATE_LOST"
            act.forward(x)
            assert act.backward(np.ones(3, np.float32)).tolist() == [1.0, 0.0, 1.0]
            moved.close()
    finally:
        a.stop()
        b.stop()


def test_a_retry_on_the_replica_that_took_the_session_over_gets_the_first_answer(redis):
    """Exactly once across replicas: a numbered TrainStep answered on a (its answer, say, lost),
    then the session taken over by b, then the same request sent to b: b answers the first
    answer bit for bit (dx included) from what a stored, and applies nothing."""
    a, b = replica(redis, "a"), replica(redis, "b")
    data = batches(2)  # an MLP's (even seed)
    try:
        with layerd.Client(a.addr) as on_a, layerd.Client(b.addr) as on_b:
            s = on_a.session(session_id="once")
            net = s.sequential(MEMBERS, layer_id="net", dtype=np.float64)
            opt = s.optimizer("adam", lr=0.01, optimizer_id="adam")
            net.train_step(*data[0], opt)
            first = net.train_step(*data[1], opt, return_dx=True)
            moved = on_b.attach("once")  # a hands it over, answers included
            net_b, opt_b = moved.get_layer("net"), moved.get_optimizer("adam")
            params = net_b.params()
            opt_b.steps = 1  # the retry: numbered as the first attempt was
            again = net_b.train_step(*data[1], opt_b, return_dx=True)
            assert again[0] == first[0] and np.array_equal(again[1], first[1])
            assert opt_b.steps == 2 and moved.describe()["optimizers"]["adam"]["steps"] == 2
            for name, value in net_b.params().items():
                assert np.array_equal(value, params[name]), name
            moved.close()
    finally:
        a.stop()
        b.stop()


def test_rediss_with_a_ca_and_a_password_file(tmp_path):
    """Redis over TLS only (its certificate from a test CA, made here) requiring a password:
    layerd connects with rediss://, --session-store-ca and --session-store-password-file and
    keeps a session there; without the CA (the system's roots) it refuses to start."""
    import trustme
    from redis_store import Redis
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    for name, pem in [("ca.pem", ca.cert_pem), ("redis.pem", cert.cert_chain_pems[0]),
                      ("redis.key", cert.private_key_pem)]:
        pem.write_to_path(tmp_path / name)
    (tmp_path / "password").write_text("tls-test-password\n")
    redis = Redis.start_or_skip(tls=(tmp_path / "redis.pem", tmp_path / "redis.key", tmp_path / "ca.pem"),
                                password="tls-test-password")
    url = f"rediss://127.0.0.1:{redis.port}"
    try:
        server = replica(redis, "tls", "--session-store-ca", str(tmp_path / "ca.pem"),
                         "--session-store-password-file", str(tmp_path / "password"), url=url)
        try:
            with layerd.Client(server.addr) as client:
                s = client.session(session_id="over-tls")
                s.layer("relu", layer_id="act")
                assert s.describe()["layers"]["act"]["kind"] == "relu"
            assert len(redis.session_keys()) == 1
        finally:
            server.stop()
        with pytest.raises(AssertionError, match="session-store"):
            replica(redis, "no-ca", "--session-store-password-file", str(tmp_path / "password"), url=url)
    finally:
        redis.stop()

"""Sessions that outlive their replica (--session-store): real Redis, real nginx, real layerd
processes and the project's Python client.

- Three replicas behind nginx (deploy/nginx's configuration, hashing x-session-id), clients
  training MLPs with Adam and dropout through it: with the replica holding most sessions
  SIGKILLed mid-run, with a rolling restart of all three, with Redis (AOF on) restarted, and
  with nginx spreading calls round-robin (every call a handover): every client finishes, and
  every final parameter and loss is bit-identical to the same training on a server without a
  store (sync mode: no step replayed by the client).
- SIGSTOP of a holder: another replica takes the session over; the old holder, resumed, commits
  nothing (its write is fenced: UNAVAILABLE SESSION_MOVED) and the stored state never goes back.
- Bad store contents (garbage state, another principal's key renamed): DATA_LOSS SESSION_LOST,
  no crash, nothing served to the wrong principal.
"""
import signal
import threading
import time

import numpy as np
import pytest

import layerd
from cluster import Proxy
from layerd_server import Server
from redis_store import Redis, held, replica, wait_until

MEMBERS = [("fc1", "affine", {"in_features": 20, "out_features": 16, "seed": 1}), ("relu", "relu"),
           ("drop", "dropout", {"ratio": 0.2, "seed": 5}),
           ("fc2", "affine", {"in_features": 16, "out_features": 4, "seed": 2}), ("loss", "softmax_with_loss")]
STEPS = 60


def batches(seed):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((16, 20)), rng.integers(0, 4, 16)) for _ in range(STEPS)]


def train(client, seed, pause=None, session_id=None, resumed=None):
    """Trains one MLP (float64, Adam) for STEPS steps; answers its losses and final params.
    `pause(step)` runs before each step. A step refused with STEP_OUT_OF_ORDER (the session came
    back behind, after a crash in async mode) resumes from the count the error gives, feeding
    the batches from there; `resumed` collects how many steps each resumption went back."""
    data = batches(seed)
    with client.session(session_id=session_id) as s:
        net = s.sequential(MEMBERS, layer_id="net", dtype=np.float64)
        opt = s.optimizer("adam", lr=0.01, optimizer_id="adam")
        losses, k = [None] * STEPS, 0
        while k < STEPS:
            if pause:
                pause(k)
            try:
                losses[k] = net.train_step(*data[k], opt)
                k += 1
            except layerd.FailedPrecondition as error:
                if error.reason != "STEP_OUT_OF_ORDER" or resumed is None:
                    raise
                resumed.append(k - int(error.metadata["got"]))
                k = opt.steps = int(error.metadata["got"])
        assert opt.steps == STEPS
        return losses, net.params()


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
            yield {seed: train(client, seed) for seed in range(6)}
    finally:
        server.stop()


def same(got, want):
    assert got[0] == want[0], "losses"
    for name, value in want[1].items():
        assert np.array_equal(got[1][name], value), name


class Fleet:
    """Three replicas on one Redis behind nginx (deploy/nginx's configuration; `hashing` False
    takes its `hash` line out, so nginx spreads each client's calls round-robin)."""

    def __init__(self, redis, hashing=True, flags=()):
        self.redis, self.flags = redis, flags
        self.replicas = [replica(redis, f"r{i}", *flags) for i in range(3)]
        self.addrs = [r.addr for r in self.replicas]
        self.proxy = Proxy.start_or_skip("nginx", self.addrs, hashing=hashing)

    def restart(self, i):
        """Stops replica i (SIGTERM: its drain hands its sessions over) and starts it again on
        the same address with the same replica id."""
        assert self.replicas[i].stop() == 0
        self.replicas[i] = replica(self.redis, f"r{i}", *self.flags, addr=self.addrs[i])

    def stop(self):
        self.proxy.stop()
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.kill()


def train_through(fleet, reference, disrupt, clients=6, resumed=None):
    """`clients` trainings through the fleet's proxy; `disrupt(fleet)` runs once every client is
    past step 20, while they go on. Every client must finish bit-identical to `reference`."""
    results, errors = {}, []
    started = threading.Barrier(clients + 1)

    def pause(k):
        if k == 20:
            started.wait(timeout=60)

    def client(seed):
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
    assert fleet.redis.session_keys() == []  # closed sessions leave the store
    return outcome


def handovers(server, direction):
    return server.metrics().get(("layerd_store_handovers_total", (("direction", direction),)), 0)


@pytest.fixture
def fleet(redis):
    f = Fleet(redis)
    yield f
    f.stop()


def test_a_replica_killed_mid_run_loses_no_session_and_no_step(fleet, reference):
    def kill_the_busiest(fleet):
        counts = [held(r) for r in fleet.replicas]
        victim = max(range(3), key=lambda i: counts[i])
        assert counts[victim] >= 2, counts
        time.sleep(0.05)  # calls in flight
        fleet.replicas[victim].proc.kill()
        fleet.replicas[victim].proc.wait()
        return victim, counts[victim]

    victim, count = train_through(fleet, reference, kill_the_busiest)
    assert sum(handovers(r, "takeover") for i, r in enumerate(fleet.replicas) if i != victim) == count


def test_in_async_mode_clients_resume_from_the_stored_count_after_a_kill(redis, reference):
    fleet = Fleet(redis, flags=("--durability", "async"))
    resumed = []
    try:
        def kill_the_busiest(fleet):
            counts = [held(r) for r in fleet.replicas]
            victim = max(range(3), key=lambda i: counts[i])
            time.sleep(0.05)
            fleet.replicas[victim].proc.kill()
            fleet.replicas[victim].proc.wait()

        train_through(fleet, reference, kill_the_busiest, resumed=resumed)
        assert all(back >= 0 for back in resumed), resumed  # never ahead of what was answered
    finally:
        fleet.stop()


def test_a_rolling_restart_loses_no_session_and_no_step(fleet, reference):
    def roll(fleet):
        for i in range(3):
            fleet.restart(i)

    train_through(fleet, reference, roll)


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
            # a still has its copy at step 5: its step commits nothing and says so.
            with pytest.raises(layerd.Unavailable) as caught:
                net.train_step(*data[5], opt)
            assert caught.value.reason == "SESSION_MOVED"
            assert on_b_s.describe()["optimizers"]["adam"]["steps"] == 10
            # a asks b to hand it over, and goes on from step 10 as training without a store.
            opt.steps = 10
            for x, t in data[10:]:
                net.train_step(x, t, opt)
            assert s.describe()["replica_id"] == "a"
            for name, value in net.params().items():
                assert np.array_equal(value, reference[0][1][name]), name
            assert a.metrics().get(("layerd_store_fenced_writes_total", ()), 0) >= 1
            assert b.metrics().get(("layerd_store_handovers_total", (("direction", "out"),)), 0) == 1
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
    redis.cli("HSET", keys["garbage"], "state", "not a checkpoint")
    redis.cli("EVAL", "redis.call('HSET', KEYS[1], 'state', "
                      "string.sub(redis.call('HGET', KEYS[1], 'state'), 1, 100))", "1", keys["truncated"])
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

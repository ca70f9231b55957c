"""A real Redis for the session-store tests: redis-server from the distribution's packages
(.ci/run installs it) on a free loopback port, in a directory of its own, with or without its
append-only file; and replicas of layerd pointed at it."""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cluster import free_port, wait_for_port
from layerd_server import Server

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class Redis:
    """redis-server on 127.0.0.1:<port>; `aof` turns on the append-only file (fsync always)."""

    @staticmethod
    def start_or_skip(aof=False, tls=None, password=None):
        if not Path(REDIS_SERVER).exists() and os.environ.get("LAYERD_REQUIRE_REDIS") != "1":
            pytest.skip("redis-server not installed (apt install redis-server)")
        return Redis(aof, tls, password)

    def __init__(self, aof=False, tls=None, password=None):
        """`tls`: (certificate, key, CA) files: TLS only, no plaintext port; `password`: required."""
        self.port, self.aof, self.tls, self.password = free_port(), aof, tls, password
        self.dir = Path(tempfile.mkdtemp(prefix="layerd-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.aof
                       else ["--appendonly", "no"])
        ports = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        self.log = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *ports, "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir),
             *persistence, *auth],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def cli(self, *args):
        """redis-cli's answer to one command, as text."""
        options = ["-p", str(self.port)]
        if self.tls:
            options += ["--tls", "--cacert", str(self.tls[2])]
        if self.password:
            options += ["-a", self.password, "--no-auth-warning"]
        return subprocess.run([REDIS_CLI, *options, *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    def session_keys(self):
        """The sessions' hashes (one per stored session)."""
        return [k for k in self.cli("--scan", "--pattern", "layerd:session:*").splitlines() if k]

    def stored_keys(self):
        """Every key of a session: hashes, states, answers, and staged states but those that
        will expire within 10 s (a replica killed between staging and committing leaves one)."""
        keys = [k for k in self.cli("--scan", "--pattern", "layerd:*").splitlines()
                if k and not k.startswith("layerd:replica:")]
        return [k for k in keys if not (k.startswith("layerd:staging:") and 0 < int(self.cli("PTTL", k)) <= 10_000)]


class RedisCluster:
    """A Redis Cluster of three masters on loopback (`redis-cli --cluster create`); `url` is
    layerd's `redis-cluster://` form naming every node."""

    @staticmethod
    def start_or_skip():
        if not Path(REDIS_SERVER).exists() and os.environ.get("LAYERD_REQUIRE_REDIS") != "1":
            pytest.skip("redis-server not installed (apt install redis-server)")
        return RedisCluster()

    def __init__(self):
        self.nodes = []
        for _ in range(3):
            node = Redis.__new__(Redis)
            node.port, node.aof, node.tls, node.password = cluster_port(), False, None, None
            node.dir = Path(tempfile.mkdtemp(prefix="layerd-redis-cluster-"))
            node.url = f"redis://127.0.0.1:{node.port}"
            node.log = node.dir / "redis.log"
            node.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(node.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(node.dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
                stdout=node.log.open("a"), stderr=subprocess.STDOUT)
            wait_for_port(node.port, node.proc, node.log)
            self.nodes.append(node)
        subprocess.run([REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        wait_until(lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes),
                   message="the cluster to be ok")
        self.url = "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def session_keys(self):
        return [k for n in self.nodes for k in n.session_keys()]

    def stored_keys(self):
        return [k for n in self.nodes for k in n.stored_keys()]

    def stop(self):
        for n in self.nodes:
            n.stop()


def cluster_port():
    """A free port whose cluster bus port (port + 10000) is free too (and below 65536)."""
    import socket
    for _ in range(1000):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def replica(redis, name, *flags, addr="127.0.0.1:0", url=None):
    """A layerd replica with the session store (`url`, default redis's), its metrics endpoint and
    a short drain."""
    return Server("--session-store", url or redis.url, "--replica-id", name, "--metrics-addr", "127.0.0.1:0",
                  "--shutdown-grace", "2s", *flags, addr=addr)


def held(server):
    """Sessions `server` holds in the store (its layerd_store_sessions_held gauge)."""
    return server.metrics().get(("layerd_store_sessions_held", ()), 0)


def wait_until(condition, timeout=10.0, message="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.05)

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
    def start_or_skip(aof=False):
        if not Path(REDIS_SERVER).exists() and os.environ.get("LAYERD_REQUIRE_REDIS") != "1":
            pytest.skip("redis-server not installed (apt install redis-server)")
        return Redis(aof)

    def __init__(self, aof=False):
        self.port, self.aof = free_port(), aof
        self.dir = Path(tempfile.mkdtemp(prefix="layerd-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.aof
                       else ["--appendonly", "no"])
        self.log = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.dir), *persistence],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def cli(self, *args):
        """redis-cli's answer to one command, as text."""
        return subprocess.run([REDIS_CLI, "-p", str(self.port), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    def session_keys(self):
        return [k for k in self.cli("--scan", "--pattern", "layerd:session:*").splitlines() if k]


def replica(redis, name, *flags, addr="127.0.0.1:0"):
    """A layerd replica with the session store, its metrics endpoint and a short drain."""
    return Server("--session-store", redis.url, "--replica-id", name, "--metrics-addr", "127.0.0.1:0",
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

"""Three layerd replicas on loopback behind nginx or haproxy running deploy/'s
configuration (only the addresses changed): shared by the scale-out tests and
bench/scale_out.py."""
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from layerd_server import BINARY, REPO, Server

PROXIES = {"nginx": "/usr/sbin/nginx", "haproxy": "/usr/sbin/haproxy"}
BENCH = BINARY.parent / "layerd-bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, log):
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited:\n{Path(log).read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("proxy did not listen")


class Proxy:
    """nginx or haproxy running deploy/'s configuration, pointed at `backends`."""

    @staticmethod
    def start_or_skip(kind, backends, hashing=True):
        """The proxy; where it is not installed, skips the test (fails with
        LAYERD_REQUIRE_PROXIES=1)."""
        import pytest
        if not Path(PROXIES[kind]).exists() and os.environ.get("LAYERD_REQUIRE_PROXIES") != "1":
            pytest.skip(f"{kind} not installed (apt install nginx-light haproxy)")
        return Proxy(kind, backends, hashing)

    def __init__(self, kind, backends, hashing=True):
        """`hashing` False (nginx only) drops the hash on x-session-id: calls go round-robin."""
        binary = PROXIES[kind]
        if not Path(binary).exists():
            raise RuntimeError(f"{binary} not installed (apt install nginx-light haproxy)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"layerd-{kind}-"))
        self.dir.chmod(0o755)  # nginx workers run as another user when started as root
        source = REPO / "deploy" / kind / ("nginx.conf" if kind == "nginx" else "haproxy.cfg")
        text = re.sub(r"layerd-(\d):50051", lambda m: backends[int(m.group(1))], source.read_text())
        text = text.replace("listen 8080 http2", f"listen 127.0.0.1:{self.port} http2")
        text = text.replace("bind :8081", f"bind 127.0.0.1:{self.port}")
        text = text.replace("/tmp/nginx", str(self.dir / "nginx"))
        if not hashing:
            assert kind == "nginx"
            text = text.replace("hash $http_x_session_id consistent;", "")
        if len(backends) > 3:  # more replicas than deploy/ lists: more lines like its last
            assert kind == "nginx"
            last = f"server {backends[2]} max_fails=1 fail_timeout=2s;"
            assert last in text
            more = "".join(f"\n        server {b} max_fails=1 fail_timeout=2s;" for b in backends[3:])
            text = text.replace(last, last + more)
        config = self.dir / source.name
        config.write_text(text)
        self.log = self.dir / "proxy.log"
        cmd = ([binary, "-c", str(config), "-p", str(self.dir), "-g", "daemon off;"] if kind == "nginx"
               else [binary, "-db", "-f", str(config)])
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log)
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Cluster:
    def __init__(self):
        self.ports = [free_port() for _ in range(3)]
        self.replicas = [self.start(i) for i in range(3)]

    def start(self, i):
        return Server("--metrics-addr", "127.0.0.1:0", "--shutdown-grace", "1s", addr=f"127.0.0.1:{self.ports[i]}")

    def backends(self):
        return [f"127.0.0.1:{p}" for p in self.ports]

    def forward_calls(self, i):
        return sum(value for (name, labels), value in self.replicas[i].metrics().items()
                   if name == "layerd_calls_total" and ("method", "Forward") in labels and ("code", "OK") in labels)

    def stop(self):
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()



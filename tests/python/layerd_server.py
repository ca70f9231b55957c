"""A real layerd server process on a loopback port, for the Python suites."""
import json
import os
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("LAYERD_BIN", REPO / "target" / "debug" / "layerd"))
MAX_MESSAGE = 256 << 20


class Server:
    """A layerd process started with extra flags; its address (and, with
    --metrics-addr, its metrics address) read from its log."""

    def __init__(self, *flags, addr="127.0.0.1:0", cpus=None, cwd=None):
        assert BINARY.exists(), f"{BINARY} not built (cargo build)"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERD_")}
        self.proc = subprocess.Popen(
            [str(BINARY), "--addr", addr, "--log-format", "json", *flags],
            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
            # Pinned before it starts, so its runtime sizes itself to these cores.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.addr = self.metrics_addr = None
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            event = json.loads(line)
            if event.get("message") == "metrics serving":  # logged before "layerd serving"
                self.metrics_addr = event["addr"]
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

    def metrics(self):
        """{(name, sorted labels): value} of every sample on /metrics."""
        from prometheus_client.parser import text_string_to_metric_families
        assert self.metrics_addr, "started without --metrics-addr"
        text = urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=10).read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def rss_mib(self):
        """The process's resident memory (VmRSS), in MiB."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


class RssPeak:
    """The highest RSS of a running server, sampled every 50 ms until stop() (or until the
    server exits)."""

    def __init__(self, server):
        self.server, self.peak, self.stopped = server, server.rss_mib(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stopped.wait(0.05) and self.server.proc.poll() is None:
            try:
                self.peak = max(self.peak, self.server.rss_mib())
            except FileNotFoundError:  # exited between the two checks
                break

    def stop(self):
        """Stops sampling; returns the peak in MiB."""
        self.stopped.set()
        self.thread.join()
        return self.peak

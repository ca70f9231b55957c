"""Triton's perf_analyzer drives layerd unchanged: stateless-size sweeps, 1 Mi
tensors, sequences with its own id range, and streaming. Each run must finish
with exit 0, report throughput, and add no failed request to the server's
statistics (but the count-mode run: see there). Each run of a sequence model
has its own sequence-id range: the tests share one server.

perf_analyzer comes from bench/perf_analyzer/install.sh (run by .ci/run); where
it is not installed these tests skip, unless LAYERD_REQUIRE_PERF_ANALYZER=1.
"""
import csv
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import tritonclient.grpc as tc

from layerd_server import REPO

PERF_ANALYZER = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer") or str(
    REPO / ".venv" / "bin" / "perf_analyzer")

if not Path(PERF_ANALYZER).exists():
    if os.environ.get("LAYERD_REQUIRE_PERF_ANALYZER") == "1":
        raise RuntimeError(f"perf_analyzer not found at {PERF_ANALYZER}: run bench/perf_analyzer/install.sh")
    pytest.skip("perf_analyzer not installed (bench/perf_analyzer/install.sh)", allow_module_level=True)


def perf_analyzer(server, *args):
    """Runs perf_analyzer (short windows, wide stability band: this checks it completes,
    bench/kserve.py measures); returns its CSV rows and output."""
    out = Path(tempfile.mkdtemp(prefix="layerd-pa-")) / "pa.csv"
    cmd = [PERF_ANALYZER, "-i", "grpc", "--service-kind=triton", "-u", server.addr,
           "-p", "400", "-s", "100", "-r", "3", "-f", str(out), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout}\n{run.stderr}"
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["Inferences/Second"]) > 0 for r in rows), run.stdout
    return rows, run.stdout


# A 1 Mi call takes the debug server 0.1-0.2 s, so a 400 ms time window may hold a single
# request, whose latency alone decides stability (a CI run failed that way): windows of a
# request count instead.
LARGE_WINDOWS = ("--measurement-mode", "count_windows", "--measurement-request-count", "6")


def failures(server, model):
    with tc.InferenceServerClient(server.addr) as client:
        stats = client.get_inference_statistics(model).model_stats[0].inference_stats
        return stats.fail.count, stats.success.count


def test_small_tensors_over_a_concurrency_range(server):
    rows, out = perf_analyzer(server, "-m", "relu", "--shape", "x:1024", "--concurrency-range", "1:8:7",
                              "--sequence-id-range", "1:1000")
    assert [int(r["Concurrency"]) for r in rows] == [1, 8]
    assert "Server:" in out and "compute infer" in out, "server-side statistics are reported"
    fails, successes = failures(server, "relu")
    # On a failure, the server's own account of it (its log line says code and message).
    assert fails == 0 and successes > 0, "".join(line for line in server.log if "failed" in line)[-4000:]


def test_one_mebi_element_tensors_on_a_stateless_model(server):
    rows, out = perf_analyzer(server, "-m", "sigmoid_no_grad", "--shape", "x:1048576", "--concurrency-range", "1:2",
                             *LARGE_WINDOWS)
    assert len(rows) == 2 and "Sequence count" not in out
    fails, successes = failures(server, "sigmoid_no_grad")
    assert fails == 0 and successes > 0


def test_one_mebi_element_tensors_in_sequences(server):
    # A fixed request count: perf_analyzer keeps every request's buffers until it exits. In
    # that mode it may stop a sequence in the middle and send one more request for it after
    # the sequence has been given up (NOT_FOUND): at most one per concurrent slot. Its own id
    # range, so that a sequence it leaves open cannot meet another test's START.
    before = failures(server, "relu")[0]
    rows, out = perf_analyzer(server, "-m", "relu", "--shape", "x:1048576", "--concurrency-range", "2",
                              "--request-count", "40", "--sequence-id-range", "2000:2100")
    assert "Sequence count" in out
    assert failures(server, "relu")[0] - before <= 2


def test_sequence_mode_with_an_id_range(server):
    rows, out = perf_analyzer(server, "-m", "identity", "--shape", "x:4096", "--concurrency-range", "4",
                              "--sequence-length", "5", "--sequence-id-range", "1000:1100")
    assert "Sequence count" in out, "perf_analyzer drove the model as sequences"
    fails, successes = failures(server, "identity")
    assert fails == 0 and successes > 0


def test_streaming(server):
    before = failures(server, "relu")[0]
    perf_analyzer(server, "-m", "relu", "--shape", "x:256", "--concurrency-range", "2", "--streaming",
                  "--sequence-id-range", "3000:3100")
    assert failures(server, "relu")[0] == before


@pytest.fixture(scope="module")
def shm_server():
    from layerd_server import Server
    s = Server("--allow-client-shm")
    yield s
    assert s.stop() == 0


@pytest.mark.parametrize("shape", ["x:1024", "x:1048576"])
def test_system_shared_memory(shm_server, shape):
    """`--shared-memory system`: perf_analyzer registers its regions, names them in every
    request's input and output, and unregisters them at the end (libcudart from
    bench/perf_analyzer/install.sh, which perf_analyzer loads even for system memory)."""
    rows, out = perf_analyzer(shm_server, "-m", "relu_no_grad", "--shape", shape,
                              "--shared-memory", "system", "--output-shared-memory-size",
                              str(4 * int(shape.split(":")[1])), "--concurrency-range", "2",
                              *(LARGE_WINDOWS if shape == "x:1048576" else ()))
    fails, successes = failures(shm_server, "relu_no_grad")
    assert fails == 0 and successes > 0
    with tc.InferenceServerClient(shm_server.addr) as client:
        assert client.get_system_shared_memory_status(as_json=True) == {}, "all unregistered"

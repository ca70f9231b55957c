"""The README's code runs as written (against a real server) and its lists match the server:
the Python session, the client package, the KServe quickstart with tritonclient, the
perf_analyzer commands, the recipe that recovers a lost session, the KServe model table
(against RepositoryIndex) and the error tables (against the reasons in src/)."""
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import tritonclient.grpc as tc

from conftest import compile_proto
from layerd_server import BINARY, REPO, Server

README = (REPO / "README.md").read_text()
DOC_ADDR = "127.0.0.1:50051"


def block(name):
    """The fenced block after `<!-- tested: NAME -->`."""
    found = re.search(rf"<!-- tested: {re.escape(name)} -->\n```\w+\n(.*?)```", README, re.S)
    assert found, f"README has no tested block {name!r}"
    return found.group(1)


def run_block(name, addr, namespace=None):
    namespace = {} if namespace is None else namespace
    exec(compile(block(name).replace(DOC_ADDR, addr), f"README:{name}", "exec"), namespace)
    return namespace


def test_the_python_session_runs(server, capsys):
    compile_proto()  # the README's protoc step: layerd_pb2 and layerd_pb2_grpc on sys.path
    run_block("python-session", server.addr)
    assert capsys.readouterr().out.split() == "[[1.5 0. ] [0. 3. ]] [[0.1 0. ] [0. 0.4]]".split()


def run_script(code, **kw):
    """Python code in its own process, as a user runs it (the layerd package's generated
    module and the flat layerd_pb2 of the protoc step cannot share one process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kw)


def test_the_python_client_example_runs(server):
    done = run_script(block("python-client").replace(DOC_ADDR, server.addr))
    assert done.returncode == 0, done.stderr
    assert "StatusCode.INVALID_ARGUMENT UNKNOWN_KIND" in done.stdout


def test_the_python_training_example_runs(server):
    done = run_script(block("python-training").replace(DOC_ADDR, server.addr))
    assert done.returncode == 0, done.stderr
    losses = [float(line.split()[1]) for line in done.stdout.splitlines()]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses


def test_the_python_train_step_example_runs(server):
    done = run_script(block("python-train-step").replace(DOC_ADDR, server.addr))
    assert done.returncode == 0, done.stderr
    losses = [float(line.split()[1]) for line in done.stdout.splitlines()]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses


def test_the_kserve_quickstart_runs(server, capsys):
    names = run_block("kserve-quickstart", server.addr)
    out = capsys.readouterr().out
    assert out.startswith("True ['identity', "), out
    assert "[[1. 0. 3.]\n [0. 5. 0.]]" in out
    assert "[[0.5 0.  0.5]\n [0.  0.5 0. ]]" in out
    # Behind a load balancer: the same client, the routing header, two ReLU instances.
    names = run_block("kserve-load-balancer", server.addr, names)
    assert names["dx"].tolist() == [[0.5, 0, 0.5], [0, 0.5, 0]]
    with pytest.raises(tc.InferenceServerException, match="NOT_FOUND|not found|no session"):
        names["client"].infer("relu_backward", [names["dout"]], sequence_id=7)  # the end closed it


def test_the_shared_memory_example_runs(capsys):
    server = Server("--allow-client-shm")
    try:
        names = run_block("kserve-quickstart", server.addr)
        capsys.readouterr()
        run_block("kserve-shm", server.addr, names)
        assert capsys.readouterr().out.strip() == "[0. 0. 0. 0. 0. 1. 2. 3.]"
        assert names["client"].get_system_shared_memory_status(as_json=True) == {}
    finally:
        assert server.stop() == 0


def test_the_perf_analyzer_commands_run(server):
    perf_analyzer = shutil.which("perf_analyzer") or str(REPO / ".venv" / "bin" / "perf_analyzer")
    if not os.path.exists(perf_analyzer):
        if os.environ.get("LAYERD_REQUIRE_PERF_ANALYZER") == "1":
            raise RuntimeError("perf_analyzer not installed: bash bench/perf_analyzer/install.sh")
        pytest.skip("perf_analyzer not installed")
    commands = block("perf-analyzer").strip().splitlines()
    assert [c.split()[c.split().index("-m") + 1] for c in commands] == ["relu_no_grad", "relu"]
    for command in commands:
        # Short windows: this checks the commands work, bench/kserve.py measures.
        args = command.replace(DOC_ADDR, server.addr).split()[1:] + ["-p", "400", "-s", "100", "-r", "3"]
        done = subprocess.run([perf_analyzer, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        assert "Throughput" in done.stdout
        assert ("Sequence count" in done.stdout) == ("--sequence-length" in command)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.pem, server.pem and server.key (for localhost), as the README's TLS section names them."""
    import trustme
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(d / "server.pem")
    cert.private_key_pem.write_to_path(d / "server.key")
    return d


def test_the_tls_section_runs(pki):
    """The server, layerd-cli, layerd-bench, the layerd client and tritonclient over TLS."""
    server_line, *client_lines = [line.split("#")[0].split() for line in block("tls-shell").strip().splitlines()]
    assert server_line[0] == "layerd"
    server = Server(*server_line[1:], addr="127.0.0.1:0", cwd=pki)
    try:
        port = server.addr.rsplit(":", 1)[1]
        for line in client_lines:
            binary = BINARY.parent / line[0]  # the tools built beside the server
            args = [a.replace("50051", port) for a in line[1:]]
            done = subprocess.run([str(binary), *args], cwd=pki, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{line}: {done.stdout}{done.stderr}"
        code = block("tls-python").replace("localhost:50051", f"localhost:{port}")
        done = run_script(code, cwd=pki)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["[1.", "0.]", "True"]
    finally:
        assert server.stop() == 0


def test_the_session_store_section_runs():
    """Two replicas on one Redis as the README starts them; the Python block, with the first
    replica SIGKILLed where its comment says, goes on on the second."""
    from redis_store import Redis
    redis = Redis.start_or_skip()
    lines = [line.split() for line in block("session-store-shell").strip().splitlines()]
    replicas = []
    try:
        ports = [free_port(), free_port()]
        for line, port in zip(lines, ports):
            assert line[0] == "layerd"
            args = [a.replace("redis://127.0.0.1:6379", redis.url) for a in line[1:]]
            addr = args.pop(args.index("--addr") + 1)
            args.remove("--addr")
            replicas.append(Server(*args, addr=addr.replace(addr.rsplit(":", 1)[1], str(port))))
        code = block("session-store-python").replace("50051", str(ports[0])).replace("50052", str(ports[1]))
        first, rest = code.split("# ... the replica r0 is killed here ...")
        kill = f"import os, signal; os.kill({replicas[0].proc.pid}, signal.SIGKILL)\n"
        done = run_script(first + kill + rest)
        assert done.returncode == 0, done.stderr
        loss0, (steps, loss1, where) = float(done.stdout.split()[0]), done.stdout.split()[1:]
        assert (steps, where) == ("1", "r1") and float(loss1) < loss0
        assert replicas[0].proc.wait(timeout=10) == -9
        assert redis.stored_keys() == []
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.kill()
        redis.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECIPE_DRIVER = """
first = net.session.id
print("stepped", dx.tolist(), flush=True)
input()  # the test kills the server here, and starts it again half a second later
dx = net.step(np.array([-1.0, 2.0], np.float32), np.full(2, 3, np.float32))
print("stepped", dx.tolist(), net.session.id != first, flush=True)
"""


def test_the_recipe_recovers_a_session_after_its_server_is_lost():
    addr = f"127.0.0.1:{free_port()}"
    servers = [Server(addr=addr)]
    client = subprocess.Popen([sys.executable, "-c", block("recover-session").replace(DOC_ADDR, addr) + RECIPE_DRIVER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().split() == ["stepped", "[1.0,", "0.0]"]
        servers[0].proc.kill()
        servers[0].proc.wait()
        # It comes back empty, on the same address, while the client retries UNAVAILABLE.
        threading.Timer(0.5, lambda: servers.append(Server(addr=addr))).start()
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().split() == ["stepped", "[0.0,", "3.0]", "True"]
        assert client.wait(timeout=30) == 0 and len(servers) == 2
    finally:
        client.kill()
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()


def test_the_model_table_is_the_servers_repository_index(server):
    section = README[README.index("### Models"):README.index("### Sequences are sessions")]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {name for line in table for name in re.findall(r"`(\w+)`", line.split("|")[1])}
    with tc.InferenceServerClient(server.addr) as client:
        served = {m.name for m in client.get_model_repository_index().models}
        assert documented == served
        for name in served:  # the table's sequence column matches each ModelConfig
            config = client.get_model_config(name).config
            assert config.HasField("sequence_batching") == (not name.endswith("_no_grad")), name


def error_reasons_in_source():
    """Every ErrorInfo reason the server can answer: the string literals in src/ that are reasons."""
    text = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.rs"))
    # Flags' value names (`value_name = "FILE"`) are not reasons either.
    text = re.sub(r'value_name = "[A-Z_]+"', "", text)
    literals = set(re.findall(r'"([A-Z][A-Z_]{3,})"', text))
    not_reasons = {"READY", "CARGO_PKG_VERSION", "DTYPE_UNSPECIFIED"}
    # Environment variables (layerd's own, glibc's malloc settings) are not reasons.
    return {r for r in literals if not r.startswith(("LAYERD_", "MALLOC_")) and r not in not_reasons}


def test_every_error_reason_is_in_both_error_tables():
    reasons = error_reasons_in_source()
    assert {"SESSION_NOT_FOUND", "OVERLOADED", "STATELESS_MODEL", "INVALID_TENSOR"} <= reasons
    errors = README[README.index("## Errors"):README.index("## Handling errors")]
    handling = README[README.index("## Handling errors"):README.index("## Configuration")]
    missing = {r for r in reasons if f"`{r}`" not in errors}
    assert not missing, f"reasons missing from the Errors table: {sorted(missing)}"
    # The handling table names a reason, or covers all of its code's reasons ("every reason").
    codes = dict(re.findall(r"^\| (\w+) \| [^|]*`(\w+)`", errors, re.M))
    for reason in reasons:
        row_code = next((line.split("|")[1].strip() for line in errors.splitlines() if f"`{reason}`" in line), None)
        covered = f"`{reason}`" in handling or re.search(rf"^\| {row_code} \| every reason", handling, re.M)
        assert covered, f"{reason} ({row_code}) has no row in Handling errors"
    assert codes  # the tables parsed

"""The examples run as a user runs them, against a real server, and match the same training
done in-process with the tests' numpy reference."""
import subprocess
import sys

import numpy as np
import pytest

import reference_training as ref
from layerd_server import REPO

sys.path.insert(0, str(REPO / "examples"))


def run_example(name, server, *args):
    done = subprocess.run([sys.executable, str(REPO / "examples" / name), "--addr", server.addr, *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_train_digits_matches_the_reference_training(server):
    pytest.importorskip("sklearn")
    import train_digits as example
    steps = 300
    out = run_example("train_digits.py", server, "--steps", str(steps), "--every", "1")
    printed = {int(line.split()[1]): float(line.split()[3]) for line in out.splitlines() if line.startswith("step")}
    correct = int(out.splitlines()[-1].split()[-1].strip("()").split("/")[0])

    # The same training in-process: the same data, weights and batches, the reference layers
    # and SGD.
    (x, t), (x_test, t_test) = example.digits()
    w = example.initial_weights()
    fc1, fc2 = ref.Affine(w["fc1.W"].copy(), w["fc1.b"].copy()), ref.Affine(w["fc2.W"].copy(), w["fc2.b"].copy())
    net = ref.Sequential([("fc1", fc1), ("relu", ref.Relu()), ("fc2", fc2), ("loss", ref.SoftmaxWithLoss())])
    sgd = ref.SGD(lr=example.LR)
    losses = []
    for rows in example.batches(len(x), steps):
        losses.append(float(net.forward(x[rows], t=t[rows])))
        net.backward()
        sgd.update({"fc1.W": fc1.W, "fc1.b": fc1.b, "fc2.W": fc2.W, "fc2.b": fc2.b}, net.grads())
    want_correct = int(np.sum(np.argmax(net.forward(x_test), axis=1) == t_test))

    assert sorted(printed) == list(range(steps)), "every step's loss is printed"
    worst = max(abs(printed[s] - losses[s]) / abs(losses[s]) for s in printed)
    assert worst <= 1e-9, f"loss curves differ by {worst:.3g} relative"
    assert correct == want_correct, (correct, want_correct)
    accuracy = correct / len(t_test)
    assert losses[-1] < 0.5 * losses[0] and accuracy > 0.85, (losses[0], losses[-1], accuracy)
    print(f"\ntrain_digits: {steps} steps, max relative loss difference {worst:.2e}, "
          f"test accuracy {accuracy:.4f} ({correct}/{len(t_test)}, the reference's too)")


def test_the_node_client_trains_a_network(server):
    """examples/node: @grpc/grpc-js with layerd.proto loaded at run time; .ci/run installs it
    (npm ci) and sets LAYERD_REQUIRE_NODE so that a missing Node.js fails instead of skipping."""
    import os
    import shutil
    node_dir = REPO / "examples" / "node"
    if not (shutil.which("node") and (node_dir / "node_modules").is_dir()):
        if os.environ.get("LAYERD_REQUIRE_NODE"):
            pytest.fail("node or examples/node/node_modules missing (cd examples/node && npm ci)")
        pytest.skip("node or examples/node/node_modules missing (cd examples/node && npm ci)")
    done = subprocess.run(["node", "train.js", "--addr", server.addr], cwd=node_dir,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(line.split()[3]) for line in done.stdout.splitlines() if line.startswith("step")]
    assert losses[-1] < 0.25 < losses[0], losses
    print(f"\nnode example: loss {losses[0]:.3f} → {losses[-1]:.3f}")


def test_split_learning_matches_the_network_trained_in_one_process(server):
    pytest.importorskip("sklearn")
    import train_digits as data
    steps = 200
    out = run_example("split_learning.py", server, "--steps", str(steps), "--every", "1")
    printed = {int(line.split()[1]): float(line.split()[3]) for line in out.splitlines() if line.startswith("step")}
    assert sorted(printed) == list(range(steps))
    # The whole network in one process: the same data, weights, batches and SGD.
    (x, t), _ = data.digits()
    w = data.initial_weights()
    fc1, fc2 = ref.Affine(w["fc1.W"].copy(), w["fc1.b"].copy()), ref.Affine(w["fc2.W"].copy(), w["fc2.b"].copy())
    net = ref.Sequential([("fc1", fc1), ("relu", ref.Relu()), ("fc2", fc2), ("loss", ref.SoftmaxWithLoss())])
    sgd = ref.SGD(lr=data.LR)
    losses = []
    for rows in data.batches(len(x), steps):
        losses.append(float(net.forward(x[rows], t=t[rows])))
        net.backward()
        sgd.update({"fc1.W": fc1.W, "fc1.b": fc1.b, "fc2.W": fc2.W, "fc2.b": fc2.b}, net.grads())
    worst = max(abs(printed[s] - losses[s]) / abs(losses[s]) for s in printed)
    assert worst <= 1e-9, f"loss curves differ by {worst:.3g} relative"
    assert losses[-1] < 0.5 * losses[0]
    print(f"\nsplit_learning: {steps} steps, max relative loss difference {worst:.2e}")


def test_train_convnet_reaches_its_accuracy_across_a_checkpoint(server):
    pytest.importorskip("sklearn")
    out = run_example("train_convnet.py", server, "--steps", "150")
    correct, total = map(int, out.splitlines()[-1].split()[-1].strip("()").split("/"))
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0] / 10, losses
    assert correct / total >= 0.97, out
    print(f"\ntrain_convnet: 150 steps with a save/load at 75, test accuracy {correct / total:.4f}")


def test_the_node_client_survives_the_death_of_its_replica(tmp_path):
    """examples/node through nginx in front of three replicas sharing a Redis session store: the
    replica holding the session is SIGKILLed mid-run; the script's numbered, retried TrainSteps
    go on on another replica and print every loss bit for bit as an undisturbed run does."""
    import os
    import shutil
    import signal
    from cluster import Proxy
    from redis_store import Redis, held, replica, wait_until
    node_dir = REPO / "examples" / "node"
    if not (shutil.which("node") and (node_dir / "node_modules").is_dir()):
        if os.environ.get("LAYERD_REQUIRE_NODE"):
            pytest.fail("node or examples/node/node_modules missing (cd examples/node && npm ci)")
        pytest.skip("node or examples/node/node_modules missing (cd examples/node && npm ci)")
    redis = Redis.start_or_skip()
    replicas = [replica(redis, f"r{i}") for i in range(3)]
    proxy = Proxy.start_or_skip("nginx", [r.addr for r in replicas])
    try:
        def run(addr, kill=False):
            node = subprocess.Popen(["node", "train.js", "--addr", addr, "--steps", "300", "--every", "1"],
                                    cwd=node_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            lines = []
            for line in node.stdout:
                lines.append(line)
                if kill and line.startswith("step  100"):
                    holder = next(r for r in replicas if held(r) == 1)
                    holder.proc.send_signal(signal.SIGKILL)
                    kill = False
            assert node.wait(timeout=300) == 0, "".join(lines) + node.stderr.read()
            return [line for line in lines if line.startswith("step")]

        undisturbed = run(replicas[0].addr)
        wait_until(lambda: all(held(r) == 0 for r in replicas), message="the first run's session to close")
        disturbed = run(proxy.addr, kill=True)
        assert len(disturbed) == 300 and disturbed == undisturbed
        assert sum(1 for r in replicas if r.proc.poll() is None) == 2
    finally:
        proxy.stop()
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.kill()
        redis.stop()

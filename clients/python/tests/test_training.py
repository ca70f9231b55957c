"""The client's trainable layers against a real server: configs as keyword arguments, targets,
parameter gradients, params/grads/set_params, sequentials, and typed config errors."""
import time

import numpy as np
import pytest

import layerd


def test_a_two_layer_network_trains_like_numpy(client):
    """Three SGD steps of affine -> relu -> affine -> softmax_with_loss, remote and in numpy."""
    rng = np.random.default_rng(5)
    x, t = rng.standard_normal((20, 8)), rng.integers(0, 3, 20)
    W1, b1, W2, b2 = rng.standard_normal((8, 6)) * 0.5, np.zeros(6), rng.standard_normal((6, 3)) * 0.5, np.zeros(3)
    with client.session() as s:
        net = s.sequential([("fc1", "affine", {"in_features": 8, "out_features": 6}), ("relu", "relu"),
                            ("fc2", "affine", {"in_features": 6, "out_features": 3}), ("loss", "softmax_with_loss")],
                           params={"fc1.W": W1, "fc1.b": b1, "fc2.W": W2, "fc2.b": b2})
        for _ in range(3):
            loss = net.forward(x, t=t)
            dx, grads = net.backward(return_grads=True)
            # numpy, in-process
            h = x @ W1 + b1
            a = np.where(h > 0, h, 0.0)
            scores = a @ W2 + b2
            e = np.exp(scores - scores.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
            want_loss = -np.sum(np.log(y[np.arange(20), t] + 1e-7)) / 20
            d = y.copy()
            d[np.arange(20), t] -= 1
            d /= 20
            dW2, db2 = a.T @ d, d.sum(axis=0)
            da = d @ W2.T
            dh = np.where(h > 0, da, 0.0)
            dW1, db1 = x.T @ dh, dh.sum(axis=0)
            assert loss.shape == () and abs(loss - want_loss) <= 1e-12 * abs(want_loss)
            for name, want in [("fc1.W", dW1), ("fc1.b", db1), ("fc2.W", dW2), ("fc2.b", db2)]:
                np.testing.assert_allclose(grads[name], want, rtol=0, atol=1e-12 * np.abs(want).max())
            np.testing.assert_allclose(dx, dh @ W1.T, rtol=0, atol=1e-12 * np.abs(dh @ W1.T).max())
            W1, b1, W2, b2 = W1 - 0.1 * dW1, b1 - 0.1 * db1, W2 - 0.1 * dW2, b2 - 0.1 * db2
            params = net.params()
            net.set_params({name: params[name] - 0.1 * grads[name] for name in grads})
        assert net.grads() == {}, "set_params drops the gradients"
        np.testing.assert_allclose(net.params()["fc2.W"], W2, rtol=1e-12)


def test_configured_kinds_and_their_state(client):
    rng = np.random.default_rng(6)
    with client.session() as s:
        bn = s.layer("batch_norm", num_features=3, momentum=0.5)
        x = rng.standard_normal((10, 3)).astype(np.float32)
        y = bn.forward(x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-6)
        np.testing.assert_allclose(bn.buffers()["running_mean"], 0.5 * x.mean(axis=0), rtol=1e-5)
        assert sorted(bn.params()) == ["beta", "gamma"]

        drop = s.layer("dropout", ratio=0.5, seed=3)
        ones = np.ones((4, 100), dtype=np.float32)
        mask = drop.forward(ones)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(drop.backward(ones * 2), mask * 2)
        np.testing.assert_array_equal(drop.forward(ones, eval=True), ones * np.float32(0.5))

        conv = s.layer("convolution", in_channels=1, out_channels=2, kernel_h=3, kernel_w=3, pad=1,
                       init="xavier", seed=11, dtype=np.float64)
        assert conv.params()["W"].shape == (2, 1, 3, 3) and conv.params()["W"].dtype == np.float64
        y = conv.forward(rng.standard_normal((2, 1, 5, 5)))
        pool = s.layer("pooling", pool_h=2, pool_w=2)
        assert pool.forward(y).shape == (2, 2, 2, 2)

        loss = s.layer("softmax_with_loss")
        value = loss.forward(np.zeros((2, 4)), t=np.array([0, 3]))
        assert abs(value - np.log(4)) < 1e-6
        np.testing.assert_allclose(loss.backward(), (np.full((2, 4), 0.25) - np.eye(4)[[0, 3]]) / 2)


def test_config_errors_are_typed_and_name_the_field(client):
    with client.session() as s:
        with pytest.raises(layerd.InvalidArgument) as caught:
            s.layer("convolution", in_channels=1, out_channels=1, kernel_h=0, kernel_w=3)
        assert caught.value.violations[0][0] == "config.convolution.kernel_h"
        with pytest.raises(layerd.InvalidArgument) as caught:
            s.layer("affine", in_features=2, out_features=2, params={"W": np.zeros((3, 2))})
        assert caught.value.violations[0][0] == 'params["W"]'
        with pytest.raises(layerd.ResourceExhausted):
            s.layer("affine", in_features=10**6, out_features=10**6)
        with pytest.raises(TypeError, match="kernel_size"):
            s.layer("convolution", kernel_size=3)
        with pytest.raises(TypeError, match="no config"):
            s.layer("relu", ratio=0.5)


def two_layer(rng):
    """The members of affine 8→6 → relu → affine 6→3 → softmax_with_loss and random params."""
    members = [("fc1", "affine", {"in_features": 8, "out_features": 6}), ("relu", "relu"),
               ("fc2", "affine", {"in_features": 6, "out_features": 3}), ("loss", "softmax_with_loss")]
    params = {"fc1.W": rng.standard_normal((8, 6)) * 0.5, "fc1.b": np.zeros(6),
              "fc2.W": rng.standard_normal((6, 3)) * 0.5, "fc2.b": np.zeros(3)}
    return members, params


def test_server_side_optimizers_and_train_step(client):
    """s.optimizer + net.train_step: the same updates as Forward, Backward and Optimizer.step,
    bit for bit, with dx and scores on request; optimizer errors are typed."""
    rng = np.random.default_rng(8)
    x, t = rng.standard_normal((16, 8)), rng.integers(0, 3, 16)
    members, params = two_layer(rng)
    with client.session() as a, client.session() as b:
        net_a, net_b = a.sequential(members, params=params), b.sequential(members, params=params)
        opt_a = a.optimizer("adam", lr=0.01, layers=[net_a])
        opt_b = b.optimizer("adam", lr=0.01)  # every layer with parameters: net_b
        losses = []
        for step in range(1, 6):
            loss, dx, scores = net_a.train_step(x, t, opt_a, return_dx=True, return_scores=True)
            want_scores = net_b.forward(x, no_grad=True)
            want_loss = net_b.forward(x, t=t)
            want_dx = net_b.backward()
            assert opt_b.step() == step == opt_a.steps
            assert loss == float(want_loss) and np.array_equal(dx, want_dx) and np.array_equal(scores, want_scores)
            losses.append(loss)
        assert isinstance(net_a.train_step(x, t, opt_a), float)
        for name, value in net_b.params().items():
            assert not np.array_equal(value, params[name]), name
        assert losses[-1] < losses[0]
        with pytest.raises(layerd.AlreadyExists) as caught:
            a.optimizer("sgd", layers=[net_a])
        assert caught.value.reason == "PARAMS_OWNED"
        fresh = a.sequential(members, params=params)
        idle = a.optimizer("momentum", layers=[fresh])
        with pytest.raises(layerd.FailedPrecondition) as caught:
            idle.step()
        assert caught.value.reason == "NO_GRADIENTS"
        with pytest.raises(layerd.InvalidArgument) as caught:
            fresh.train_step(x, t, opt_a)
        assert caught.value.reason == "NOT_OWNED"
        with pytest.raises(ValueError):
            a.optimizer("lbfgs")


def test_pipelined_train_steps_give_the_same_bits_and_stop_cleanly(client):
    """net.train_steps: the losses, dx and parameters of train_step one after another, with up
    to `depth` calls in flight; an error raises at its step with the steps before it applied and
    none after; leaving the loop early waits for the steps already sent; a stale optimizer count
    is refused."""
    rng = np.random.default_rng(9)
    batches = [(rng.standard_normal((16, 8)), rng.integers(0, 3, 16)) for _ in range(12)]
    members, params = two_layer(rng)
    with client.session() as a, client.session() as b:
        net_a, net_b = a.sequential(members, params=params), b.sequential(members, params=params)
        opt_a, opt_b = a.optimizer("adam", lr=0.01), b.optimizer("adam", lr=0.01)
        want = [net_a.train_step(x, t, opt_a, return_dx=True) for x, t in batches]
        got = list(net_b.train_steps(batches, opt_b, depth=4, return_dx=True))
        assert [loss for loss, _ in got] == [loss for loss, _ in want]
        assert all(np.array_equal(g[1], w[1]) for g, w in zip(got, want))
        assert opt_b.steps == opt_a.steps == 12
        for name, value in net_a.params().items():
            assert np.array_equal(net_b.params()[name], value), name
        with pytest.raises(ValueError):
            next(net_b.train_steps(batches, opt_b, depth=0))

    with client.session() as s:
        net = s.sequential(members, params=params)
        opt = s.optimizer("sgd", lr=0.1)
        bad = batches[:3] + [(batches[3][0].astype(np.float32), batches[3][1])] + batches[4:]
        seen = []
        with pytest.raises(layerd.InvalidArgument) as caught:
            for loss in net.train_steps(bad, opt, depth=3):
                seen.append(loss)
        assert caught.value.reason == "DTYPE_MISMATCH" and len(seen) == 3
        time.sleep(0.3)  # the cancelled later steps are gone, not waiting
        assert opt.steps == 3 and net.train_step(*batches[0], opt) and opt.steps == 4

        for k, _ in enumerate(net.train_steps(batches, opt, depth=3)):
            if k == 1:
                break  # two answered and two more sent (depth 3 in flight): those are waited for
        assert opt.steps == 4 + 4
        assert net.train_step(*batches[0], opt) and opt.steps == 9

        opt.steps = 2  # a stale view: the server's optimizer has applied 9
        with pytest.raises(layerd.FailedPrecondition) as caught:
            list(net.train_steps(batches, opt))
        assert caught.value.reason == "STEP_OUT_OF_ORDER"


def test_checkpoints_save_load_and_train_on(client, tmp_path):
    """layerd.save / layerd.load: a session's layers, parameters, optimizer state and step count
    come back in a new session, and training goes on as it would have."""
    rng = np.random.default_rng(9)
    x, t = rng.standard_normal((12, 8)), rng.integers(0, 3, 12)
    members = [("fc1", "affine", {"in_features": 8, "out_features": 6, "seed": 1}), ("relu", "relu"),
               ("drop", "dropout", {"ratio": 0.2, "seed": 3}),
               ("fc2", "affine", {"in_features": 6, "out_features": 3, "seed": 2}), ("loss", "softmax_with_loss")]
    with client.session() as s:
        net = s.sequential(members, layer_id="net", dtype=np.float64)
        opt = s.optimizer("adam", lr=0.01, optimizer_id="adam")
        for _ in range(3):
            net.train_step(x, t, opt)
        layerd.save(s, tmp_path / "net.safetensors")
        straight = [net.train_step(x, t, opt) for _ in range(3)]
        with layerd.load(client, tmp_path / "net.safetensors") as resumed:
            again = resumed.get_layer("net")
            resumed_opt = resumed.get_optimizer("adam")
            assert (resumed_opt.algorithm, resumed_opt.steps) == ("adam", 3)  # as the server has it
            assert [again.train_step(x, t, resumed_opt) for _ in range(3)] == straight
            assert resumed_opt.steps == 6
            for name, value in net.params().items():
                assert np.array_equal(again.params()[name], value), name
    import safetensors.numpy
    tensors = safetensors.numpy.load((tmp_path / "net.safetensors").read_bytes())
    assert "layers.net.fc1.W" in tensors and "optimizers.adam.m.net.fc2.b" in tensors
    with pytest.raises(layerd.InvalidArgument) as caught:
        client.import_session(b"not a checkpoint")
    assert caught.value.reason == "INVALID_CHECKPOINT"

"""The trainable layers through a plain grpcio client, against the tests' own numpy reference.

Elementwise results (Dropout with the server's mask, its evaluation scaling, SoftmaxWithLoss
backward given the same softmax) must be bit-identical; results built on products and sums
within 1e-12 (float64) / 1e-5 (float32) relative, measured as max|a - b| / max|b|.
"""
import uuid
import zlib

import numpy as np
import pytest

import reference_training as ref

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def to_tensor(pb2, a):
    a = np.asarray(a)
    dtype = {np.dtype(np.float32): pb2.DTYPE_FLOAT32, np.dtype(np.float64): pb2.DTYPE_FLOAT64,
             np.dtype(np.int64): pb2.DTYPE_INT64}[a.dtype]
    return pb2.Tensor(dtype=dtype, shape=list(a.shape),
                      data=np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())


def from_tensor(pb2, t):
    dtype = {pb2.DTYPE_FLOAT32: "<f4", pb2.DTYPE_FLOAT64: "<f8"}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


def close(ours, want, what=""):
    assert ours.shape == want.shape, (what, ours.shape, want.shape)
    assert ours.dtype == want.dtype, (what, ours.dtype, want.dtype)
    scale = np.max(np.abs(want)) if want.size else 0.0
    err = np.max(np.abs(ours.astype(np.float64) - want)) / scale if scale else np.max(np.abs(ours), initial=0.0)
    assert err <= TOL[want.dtype], f"{what}: relative error {err:.3g}"


def bits_equal(ours, want, what=""):
    assert ours.shape == want.shape and ours.dtype == want.dtype, what
    view = {4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
    diff = np.flatnonzero(ours.view(view).ravel() != want.view(view).ravel())
    assert diff.size == 0, f"{what}: {diff.size} elements differ, first at {diff[:5]}"


class Remote:
    """One layer instance in its own session."""

    def __init__(self, pb2, stub, kind, config=None, params=None, dtype=None):
        self.pb2, self.stub = pb2, stub
        self.session = stub.CreateSession(pb2.CreateSessionRequest(session_id=uuid.uuid4().hex)).session_id
        self.layer = kind
        request = pb2.CreateLayerRequest(session_id=self.session, layer_id=kind, kind=kind)
        if config is not None:
            request.config.CopyFrom(config)
        for name, value in (params or {}).items():
            request.params[name].CopyFrom(to_tensor(pb2, value))
        if dtype is not None:
            request.dtype = dtype
        stub.CreateLayer(request)

    def forward(self, x, t=None, eval=False, no_grad=False):
        request = self.pb2.ForwardRequest(session_id=self.session, layer_id=self.layer,
                                          x=to_tensor(self.pb2, x), eval=eval, no_grad=no_grad)
        if t is not None:
            request.t.CopyFrom(to_tensor(self.pb2, t))
        return from_tensor(self.pb2, self.stub.Forward(request).y)

    def backward(self, dout=None):
        request = self.pb2.BackwardRequest(session_id=self.session, layer_id=self.layer, return_grads=True)
        if dout is not None:
            request.dout.CopyFrom(to_tensor(self.pb2, dout))
        r = self.stub.Backward(request)
        return from_tensor(self.pb2, r.dx), {k: from_tensor(self.pb2, v) for k, v in r.grads.items()}

    def params(self, include_grads=False):
        r = self.stub.GetParams(self.pb2.GetParamsRequest(session_id=self.session, layer_id=self.layer,
                                                          include_grads=include_grads))
        conv = lambda m: {k: from_tensor(self.pb2, v) for k, v in m.items()}  # noqa: E731
        return conv(r.params), conv(r.buffers), conv(r.grads)

    def close(self):
        self.stub.CloseSession(self.pb2.CloseSessionRequest(session_id=self.session))


def rng_for(*key):
    # crc32 of the key's text, not hash(): Python salts str hashes per process, which made
    # every run draw other values (and a rare draw cancel a gradient to 1e-3 of its terms).
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("x_shape,out", [((1, 5), 3), ((4, 6), 1), ((3, 2, 2, 2), 5), ((7, 1, 3), 4)])
def test_affine(pb, stub, dtype, x_shape, out):
    pb2, _ = pb
    r = rng_for("affine", x_shape, out, dtype)
    n_in = int(np.prod(x_shape[1:]))
    W, b = r.standard_normal((n_in, out)).astype(dtype), r.standard_normal(out).astype(dtype)
    x, dout = r.standard_normal(x_shape).astype(dtype), r.standard_normal((x_shape[0], out)).astype(dtype)
    config = pb2.LayerConfig(affine=pb2.AffineConfig(in_features=n_in, out_features=out))
    layer = Remote(pb2, stub, "affine", config, {"W": W, "b": b})
    want = ref.Affine(W, b)
    close(layer.forward(x), want.forward(x), "y")
    dx, grads = layer.backward(dout)
    close(dx, want.backward(dout), "dx")
    for name in ("W", "b"):
        close(grads[name], want.grads[name], name)
    params, buffers, stored = layer.params(include_grads=True)
    bits_equal(params["W"], W, "W as given")
    assert buffers == {}
    for name in ("W", "b"):
        bits_equal(stored[name], grads[name], "stored " + name)
    layer.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("target", ["classes", "probabilities"])
@pytest.mark.parametrize("n,c", [(1, 1), (1, 4), (5, 3), (8, 10)])
def test_softmax_with_loss(pb, stub, dtype, target, n, c):
    pb2, _ = pb
    r = rng_for("softmax", n, c, dtype, target)
    x = (r.standard_normal((n, c)) * 3).astype(dtype)
    if target == "classes":
        t = r.integers(0, c, n).astype(np.int64)
    else:
        t = r.random((n, c)).astype(dtype)
        t /= t.sum(axis=1, keepdims=True)
    layer = Remote(pb2, stub, "softmax_with_loss")
    want = ref.SoftmaxWithLoss()
    loss = layer.forward(x, t=t)
    assert loss.shape == () and loss.dtype == dtype
    close(loss, np.asarray(want.forward(x, t=t)), "loss")
    dx, grads = layer.backward()
    close(dx, want.backward(), "dx")
    assert grads == {}
    # A [] dout of 2 scales dx; the kept state stays, so Backward repeats.
    dx2, _ = layer.backward(np.asarray(2.0, dtype=dtype))
    close(dx2, want.backward(np.asarray(2.0, dtype=dtype)), "dx with dout 2")
    layer.close()


def test_softmax_backward_is_bitwise_given_the_same_softmax(pb, stub):
    """Where the softmax is exact (equal scores: y = 1/C), dx is bit for bit numpy's."""
    pb2, _ = pb
    for dtype in DTYPES:
        x = np.zeros((6, 4), dtype=dtype)
        t = np.array([0, 3, 1, 1, 2, 0], dtype=np.int64)
        layer = Remote(pb2, stub, "softmax_with_loss")
        layer.forward(x, t=t)
        want = ref.SoftmaxWithLoss()
        want.forward(x, t=t)
        bits_equal(layer.backward()[0], want.backward(), "dx")
        layer.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dropout_masks_are_seeded_and_backward_uses_forwards(pb, stub, dtype):
    pb2, _ = pb
    ratio = 0.3
    config = pb2.LayerConfig(dropout=pb2.DropoutConfig(ratio=ratio, seed=42))
    a, b = Remote(pb2, stub, "dropout", config), Remote(pb2, stub, "dropout", config)
    x = (np.random.default_rng(1).random((200, 500)) + 0.5).astype(dtype)  # no zeros
    y = a.forward(x)
    mask = y != 0
    bits_equal(y, ref.Dropout(ratio).forward(x, mask=mask), "y = x * mask")
    kept = mask.mean()
    # 100,000 Bernoulli(0.7) draws: std 0.00145; 5 sigma.
    assert abs(kept - (1 - ratio)) < 0.0073, kept
    bits_equal(b.forward(x), y, "same seed, same mask")
    assert not np.array_equal(a.forward(x) != 0, mask), "the generator moves on"
    # Backward uses the mask of the last keeping Forward.
    y2 = a.forward(x)
    dout = np.random.default_rng(2).standard_normal(x.shape).astype(dtype)
    want = ref.Dropout(ratio)
    want.forward(x, mask=y2 != 0)
    bits_equal(a.backward(dout)[0], want.backward(dout), "dx = dout * mask")
    # no_grad draws without moving the generator or the kept mask.
    a.forward(x, no_grad=True)
    bits_equal(a.backward(dout)[0], want.backward(dout), "dx after no_grad")
    # Evaluation: scaled by 1 - ratio rounded to the dtype, both ways.
    want = ref.Dropout(ratio)
    bits_equal(a.forward(x, eval=True), want.forward(x, eval=True), "eval y")
    bits_equal(a.backward(dout)[0], want.backward(dout), "eval dx")
    a.close(), b.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 3), (6, 4), (2, 3, 4, 5), (1, 2, 1, 1), (5, 1, 3, 3)], ids=str)
def test_batch_norm(pb, stub, dtype, shape):
    pb2, _ = pb
    r = rng_for("bn", shape, dtype)
    f = shape[1]
    gamma, beta = r.standard_normal(f).astype(dtype), r.standard_normal(f).astype(dtype)
    config = pb2.LayerConfig(batch_norm=pb2.BatchNormConfig(num_features=f, momentum=0.8))
    layer = Remote(pb2, stub, "batch_norm", config, {"gamma": gamma, "beta": beta})
    want = ref.BatchNorm(gamma, beta, momentum=0.8)
    for step in range(2):
        x = (r.standard_normal(shape) * 2 + 1).astype(dtype)
        dout = r.standard_normal(shape).astype(dtype)
        close(layer.forward(x), want.forward(x), f"train y {step}")
        dx, grads = layer.backward(dout)
        close(dx, want.backward(dout), f"train dx {step}")
        for name in ("gamma", "beta"):
            close(grads[name], want.grads[name], name)
    _, buffers, _ = layer.params()
    close(buffers["running_mean"], want.running_mean, "running_mean")
    close(buffers["running_var"], want.running_var, "running_var")
    # no_grad and eval leave the running statistics alone.
    layer.forward(x, no_grad=True)
    x = r.standard_normal(shape).astype(dtype)
    close(layer.forward(x, eval=True), want.forward(x, eval=True), "eval y")
    close(layer.backward(dout)[0], want.backward(dout), "eval dx")
    _, after, _ = layer.params()
    bits_equal(after["running_mean"], buffers["running_mean"], "running_mean unchanged")
    layer.close()


CONV_CASES = [
    # x shape, (FN, FH, FW), stride, pad
    ((1, 1, 5, 5), (2, 3, 3), 1, 0),
    ((2, 3, 7, 6), (4, 3, 3), 2, 1),
    ((3, 2, 4, 4), (1, 4, 4), 1, 0),   # output 1x1
    ((1, 1, 1, 1), (3, 3, 3), 1, 1),   # padding only around one cell: 1x1
    ((2, 2, 9, 7), (3, 2, 5), 3, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("x_shape,kernel,stride,pad", CONV_CASES, ids=str)
def test_convolution(pb, stub, dtype, x_shape, kernel, stride, pad):
    pb2, _ = pb
    r = rng_for("conv", x_shape, kernel, dtype)
    fn, fh, fw = kernel
    c = x_shape[1]
    W, b = r.standard_normal((fn, c, fh, fw)).astype(dtype), r.standard_normal(fn).astype(dtype)
    x = r.standard_normal(x_shape).astype(dtype)
    config = pb2.LayerConfig(convolution=pb2.ConvolutionConfig(
        in_channels=c, out_channels=fn, kernel_h=fh, kernel_w=fw, stride=stride, pad=pad))
    layer = Remote(pb2, stub, "convolution", config, {"W": W, "b": b})
    want = ref.Convolution(W, b, stride, pad)
    y = layer.forward(x)
    close(y, want.forward(x), "y")
    dout = r.standard_normal(y.shape).astype(dtype)
    dx, grads = layer.backward(dout)
    close(dx, want.backward(dout), "dx")
    for name in ("W", "b"):
        close(grads[name], want.grads[name], name)
    layer.close()


POOL_CASES = [
    ((1, 1, 4, 4), (2, 2), None, 0),
    ((2, 3, 5, 5), (2, 2), 2, 1),
    ((1, 2, 5, 4), (3, 2), 1, 0),      # overlapping windows
    ((2, 1, 3, 3), (3, 3), 1, 0),      # output 1x1
    ((1, 2, 7, 7), (3, 3), 2, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("x_shape,pool,stride,pad", POOL_CASES, ids=str)
def test_pooling(pb, stub, dtype, x_shape, pool, stride, pad):
    pb2, _ = pb
    r = rng_for("pool", x_shape, pool, dtype)
    # Few distinct values: many ties, which np.argmax breaks.
    x = r.integers(-3, 3, x_shape).astype(dtype)
    x.ravel()[r.choice(x.size, size=max(1, x.size // 10), replace=False)] = np.nan
    config = pb2.LayerConfig(pooling=pb2.PoolingConfig(pool_h=pool[0], pool_w=pool[1], stride=stride or 0, pad=pad))
    layer = Remote(pb2, stub, "pooling", config)
    want = ref.Pooling(pool[0], pool[1], stride, pad)
    y = layer.forward(x)
    bits_equal(y, want.forward(x), "y")
    dout = r.standard_normal(y.shape).astype(dtype)
    dx, _ = layer.backward(dout)
    close(dx, want.backward(dout), "dx")
    layer.close()


def sequential_config(pb2, c=1, fn=3, hidden=6, classes=4):
    member = lambda name, kind, **config: pb2.LayerSpec(name=name, kind=kind, config=pb2.LayerConfig(**config))  # noqa: E731
    return pb2.LayerConfig(sequential=pb2.SequentialConfig(layers=[
        member("conv1", "convolution", convolution=pb2.ConvolutionConfig(
            in_channels=c, out_channels=fn, kernel_h=3, kernel_w=3, pad=1)),
        member("relu1", "relu"),
        member("pool1", "pooling", pooling=pb2.PoolingConfig(pool_h=2, pool_w=2)),
        member("fc1", "affine", affine=pb2.AffineConfig(in_features=fn * 3 * 3, out_features=hidden)),
        member("relu2", "relu"),
        member("fc2", "affine", affine=pb2.AffineConfig(in_features=hidden, out_features=classes)),
        member("loss", "softmax_with_loss"),
    ]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_a_convnet_sequential_matches_the_reference(pb, stub, dtype):
    pb2, _ = pb
    r = np.random.default_rng(11)
    c, fn, hidden, classes, n = 1, 3, 6, 4, 5
    p = {"conv1.W": r.standard_normal((fn, c, 3, 3)) * 0.5, "conv1.b": r.standard_normal(fn) * 0.1,
         "fc1.W": r.standard_normal((fn * 9, hidden)) * 0.3, "fc1.b": r.standard_normal(hidden) * 0.1,
         "fc2.W": r.standard_normal((hidden, classes)) * 0.3, "fc2.b": r.standard_normal(classes) * 0.1}
    p = {k: v.astype(dtype) for k, v in p.items()}
    net = Remote(pb2, stub, "sequential", sequential_config(pb2, c, fn, hidden, classes), p)
    want = ref.Sequential([
        ("conv1", ref.Convolution(p["conv1.W"], p["conv1.b"], 1, 1)), ("relu1", ref.Relu()),
        ("pool1", ref.Pooling(2, 2)), ("fc1", ref.Affine(p["fc1.W"], p["fc1.b"])), ("relu2", ref.Relu()),
        ("fc2", ref.Affine(p["fc2.W"], p["fc2.b"])), ("loss", ref.SoftmaxWithLoss())])
    x = r.standard_normal((n, c, 6, 6)).astype(dtype)
    t = r.integers(0, classes, n).astype(np.int64)
    close(net.forward(x, t=t), np.asarray(want.forward(x, t=t)), "loss")
    dx, grads = net.backward()
    close(dx, want.backward(), "dx")
    want_grads = want.grads()
    assert sorted(grads) == sorted(want_grads) == sorted(p)
    for name in p:
        close(grads[name], want_grads[name], name)
    # Without t the sequential answers the scores, and Backward needs their gradient.
    scores = net.forward(x)
    assert scores.shape == (n, classes)
    close(scores, _scores(want, x), "scores")
    net.close()


def _scores(seq, x):
    for _, layer in seq.named[:-1]:
        x = layer.forward(x)
    return x


def test_weights_initialize_from_their_seed(pb, stub):
    pb2, _ = pb
    def weights(seed, method=pb2.Init.HE, std=0.0):
        config = pb2.LayerConfig(affine=pb2.AffineConfig(
            in_features=400, out_features=300, init=pb2.Init(method=method, seed=seed, std=std)))
        layer = Remote(pb2, stub, "affine", config, dtype=pb2.DTYPE_FLOAT64)
        params, _, _ = layer.params()
        layer.close()
        return params
    a, b, c = weights(7), weights(7), weights(8)
    bits_equal(a["W"], b["W"], "same seed")
    assert not np.array_equal(a["W"], c["W"])
    assert np.all(a["b"] == 0)
    n = a["W"].size
    for params, std in [(a, np.sqrt(2 / 400)), (weights(3, pb2.Init.XAVIER), np.sqrt(1 / 400)),
                        (weights(3, pb2.Init.NORMAL, 0.01), 0.01)]:
        w = params["W"]
        assert abs(w.mean()) < 5 * std / np.sqrt(n)
        assert abs(w.std() / std - 1) < 5 / np.sqrt(2 * n)


def test_set_params_is_all_or_nothing_and_drops_kept_state_and_grads(pb, stub):
    import grpc
    pb2, _ = pb
    config = pb2.LayerConfig(affine=pb2.AffineConfig(in_features=3, out_features=2))
    W, b = np.ones((3, 2)), np.zeros(2)
    layer = Remote(pb2, stub, "affine", config, {"W": W, "b": b})
    x = np.arange(6.0).reshape(2, 3)
    layer.forward(x)
    layer.backward(np.ones((2, 2)))
    request = pb2.SetParamsRequest(session_id=layer.session, layer_id=layer.layer)
    request.values["W"].CopyFrom(to_tensor(pb2, np.full((3, 2), 5.0)))
    request.values["b"].CopyFrom(to_tensor(pb2, np.zeros(3)))  # wrong shape
    with pytest.raises(grpc.RpcError) as caught:
        stub.SetParams(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    params, _, grads = layer.params(include_grads=True)
    bits_equal(params["W"], W, "W untouched by the failed call")
    assert sorted(grads) == ["W", "b"]
    # Backward still works from the kept Forward.
    layer.backward(np.ones((2, 2)))
    del request.values["b"]
    stub.SetParams(request)
    params, _, grads = layer.params(include_grads=True)
    bits_equal(params["W"], np.full((3, 2), 5.0), "W set")
    assert grads == {}
    with pytest.raises(grpc.RpcError) as caught:
        layer.backward(np.ones((2, 2)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    np.testing.assert_array_equal(layer.forward(x), x @ np.full((3, 2), 5.0))
    layer.close()

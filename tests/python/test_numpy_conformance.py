"""layerd against the numpy reference layers, through a plain grpcio client.

ReLU (both directions), Sigmoid backward and Identity must be bit-identical to
numpy; Sigmoid forward within 1e-6 (float32) / 1e-14 (float64) relative error,
never NaN for a non-NaN input, always in [0, 1].
"""
import itertools
import uuid

import numpy as np
import pytest

from reference import Relu, Sigmoid

DTYPES = [np.float32, np.float64]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4), (1, 2, 1, 2, 1, 2, 1, 3), (1 << 20,)]


def special_values(dtype):
    info = np.finfo(dtype)
    return np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0,
                     info.tiny, -info.tiny, info.smallest_subnormal, -info.smallest_subnormal,
                     info.tiny / 3, -info.tiny / 3, info.max, -info.max, info.eps, -info.eps,
                     88.8, -88.8, 88.7, -88.7, 87.3, -87.3, 103.0, -103.0,
                     709.0, -709.0, 710.0, -710.0, 745.0, -745.0, 1e-300, -1e-300], dtype=dtype)


def sample(shape, dtype, seed):
    """Random values of `shape` with every special value mixed in."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x = (rng.standard_normal(n) * rng.choice([1e-3, 1, 10, 100, 800], n)).astype(dtype)
    specials = special_values(dtype)
    picks = rng.choice(n, size=min(n, len(specials)), replace=False) if n else []
    for i, v in zip(picks, itertools.cycle(specials)):
        x[i] = v
    if n >= len(specials):
        x[:len(specials)] = specials
    return x.reshape(shape)


def to_tensor(pb2, a):
    dtype = {np.dtype(np.float32): pb2.DTYPE_FLOAT32, np.dtype(np.float64): pb2.DTYPE_FLOAT64}[a.dtype]
    return pb2.Tensor(dtype=dtype, shape=list(a.shape), data=np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())


def from_tensor(pb2, t):
    dtype = {pb2.DTYPE_FLOAT32: "<f4", pb2.DTYPE_FLOAT64: "<f8"}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


def assert_bits_equal(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    view = {4: np.uint32, 8: np.uint64}[ref.dtype.itemsize]
    diff = np.flatnonzero(ours.view(view).ravel() != ref.view(view).ravel())
    assert diff.size == 0, f"{diff.size} elements differ, first at {diff[:5]}: ours {ours.ravel()[diff[:5]]} numpy {ref.ravel()[diff[:5]]}"


class Layer:
    """One remote layer instance in its own session."""

    def __init__(self, pb2, stub, kind):
        self.pb2, self.stub = pb2, stub
        self.session = stub.CreateSession(pb2.CreateSessionRequest()).session_id
        self.layer = kind + "-1"
        stub.CreateLayer(pb2.CreateLayerRequest(session_id=self.session, layer_id=self.layer, kind=kind))

    def forward(self, x, no_grad=False):
        r = self.stub.Forward(self.pb2.ForwardRequest(session_id=self.session, layer_id=self.layer,
                                                      x=to_tensor(self.pb2, x), no_grad=no_grad))
        return from_tensor(self.pb2, r.y)

    def backward(self, dout):
        r = self.stub.Backward(self.pb2.BackwardRequest(session_id=self.session, layer_id=self.layer,
                                                        dout=to_tensor(self.pb2, dout)))
        return from_tensor(self.pb2, r.dx)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relu_is_bit_identical_to_numpy(pb, stub, dtype, shape):
    pb2, _ = pb
    x = sample(shape, dtype, seed=1)
    dout = sample(shape, dtype, seed=2)
    ref = Relu()
    remote = Layer(pb2, stub, "relu")
    with np.errstate(all="ignore"):
        assert_bits_equal(remote.forward(x), ref.forward(x.copy()))
        want_dx = ref.backward(dout.copy())
    assert_bits_equal(remote.backward(dout), want_dx)
    # Backward again gives the same; a no_grad Forward leaves the mask alone.
    remote.forward(-x, no_grad=True)
    assert_bits_equal(remote.backward(dout), want_dx)


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 1e-6), (np.float64, 1e-14)], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sigmoid_matches_numpy(pb, stub, dtype, tolerance, shape):
    pb2, _ = pb
    x = sample(shape, dtype, seed=3)
    dout = sample(shape, dtype, seed=4)
    dout[~np.isfinite(dout)] = 1.5  # keep the gradient check about y, not inf * 0
    ref = Sigmoid()
    remote = Layer(pb2, stub, "sigmoid")
    with np.errstate(all="ignore"):
        want_y = ref.forward(x.copy())
    y = remote.forward(x)
    assert y.shape == want_y.shape and y.dtype == want_y.dtype
    nan_in = np.isnan(x)
    assert np.array_equal(np.isnan(y), nan_in), "NaN exactly where x is NaN"
    ok = ~nan_in
    assert np.all((y[ok] >= 0) & (y[ok] <= 1)), "every y in [0, 1]"
    with np.errstate(all="ignore"):
        rel = np.abs(y[ok].astype(np.float64) - want_y[ok]) / np.abs(want_y[ok].astype(np.float64))
    rel[(y[ok] == want_y[ok])] = 0  # covers 0 == 0
    worst = rel.max(initial=0)
    assert worst <= tolerance, f"relative error {worst:.3g} at x = {x[ok].ravel()[np.argmax(rel)] if rel.size else None}"
    # Backward: bit-identical to numpy's dout * (1.0 - y) * y on the server's y.
    ref.out = y.copy()
    with np.errstate(all="ignore"):
        assert_bits_equal(remote.backward(dout), ref.backward(dout.copy()))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_identity_passes_every_bit(pb, stub, dtype):
    pb2, _ = pb
    x = sample((1000,), dtype, seed=5)
    remote = Layer(pb2, stub, "identity")
    assert_bits_equal(remote.forward(x), x)
    assert_bits_equal(remote.backward(x[::-1].copy()), x[::-1].copy())


def test_a_two_layer_chain_matches_numpy(pb, stub):
    """sigmoid(relu(x)) forward, then backward through both, against the numpy classes."""
    pb2, _ = pb
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 32))
    dout = rng.standard_normal((64, 32))
    relu_ref, sig_ref = Relu(), Sigmoid()
    session = stub.CreateSession(pb2.CreateSessionRequest(session_id=f"chain-{uuid.uuid4().hex}")).session_id
    for lid, kind in [("l1", "relu"), ("l2", "sigmoid")]:
        stub.CreateLayer(pb2.CreateLayerRequest(session_id=session, layer_id=lid, kind=kind))

    def call(rpc, lid, field, a):
        request = {"Forward": pb2.ForwardRequest, "Backward": pb2.BackwardRequest}[rpc]
        answer = getattr(stub, rpc)(request(session_id=session, layer_id=lid, **{field: to_tensor(pb2, a)}))
        return from_tensor(pb2, answer.y if rpc == "Forward" else answer.dx)

    h = call("Forward", "l1", "x", x)
    assert_bits_equal(h, relu_ref.forward(x.copy()))
    y = call("Forward", "l2", "x", h)
    np.testing.assert_allclose(y, sig_ref.forward(h.copy()), rtol=1e-14)
    sig_ref.out = y.copy()
    dh = call("Backward", "l2", "dout", dout)
    assert_bits_equal(dh, sig_ref.backward(dout.copy()))
    assert_bits_equal(call("Backward", "l1", "dout", dh), relu_ref.backward(dh.copy()))


def test_run_stream_answers_in_order(pb, stub):
    pb2, _ = pb
    remote = Layer(pb2, stub, "relu")
    xs = [sample((5,), np.float32, seed=10 + k) for k in range(20)]
    douts = [sample((5,), np.float32, seed=40 + k) for k in range(20)]

    def steps():
        for x, d in zip(xs, douts):
            yield pb2.RunRequest(forward=pb2.ForwardRequest(session_id=remote.session, layer_id=remote.layer, x=to_tensor(pb2, x)))
            yield pb2.RunRequest(backward=pb2.BackwardRequest(session_id=remote.session, layer_id=remote.layer, dout=to_tensor(pb2, d)))

    answers = list(stub.Run(steps()))
    assert len(answers) == 40
    for k, (x, d) in enumerate(zip(xs, douts)):
        ref = Relu()
        assert_bits_equal(from_tensor(pb2, answers[2 * k].forward.y), ref.forward(x.copy()))
        assert_bits_equal(from_tensor(pb2, answers[2 * k + 1].backward.dx), ref.backward(d.copy()))


@pytest.mark.parametrize("dtype,lo,hi,tolerance", [
    (np.float32, -88.8, -87.0, 1e-6),    # y is subnormal: the fewest significant bits
    (np.float32, -20.0, 20.0, 1e-6),
    (np.float64, -709.8, -700.0, 1e-14),  # y just above the subnormal range
    (np.float64, -20.0, 20.0, 1e-14),
], ids=["f32-subnormal-y", "f32-core", "f64-tiny-y", "f64-core"])
def test_sigmoid_forward_over_dense_ranges(pb, stub, dtype, lo, hi, tolerance):
    pb2, _ = pb
    x = np.linspace(lo, hi, 1 << 18, dtype=dtype)
    y = Layer(pb2, stub, "sigmoid").forward(x)
    with np.errstate(all="ignore"):
        want = 1 / (1 + np.exp(-x))
        rel = np.abs(y.astype(np.float64) - want) / np.abs(want.astype(np.float64))
    rel[y == want] = 0  # 0 == 0 gave 0/0
    assert rel.max() <= tolerance, f"relative error {rel.max():.3g} at x = {x[np.argmax(rel)]}"

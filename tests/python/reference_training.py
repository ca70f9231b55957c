"""The trainable layers in numpy, as the tests' own reference.

Written from the specification of the classic layer set (the "deep learning from scratch"
classes) with the rules layerd promises: a layer computes in its input's dtype, Python
scalars are first rounded to that dtype, elementwise formulas run left to right exactly as
written here (so layerd must match them bit for bit), batch normalization of 4-D input is
per channel, pooling pads with -inf and breaks ties by np.argmax, dropout is not inverted
(y = x * mask in training, x * (1 - ratio) in evaluation).
"""
import numpy as np

LOG_EPS = 1e-7


def scalar(value, like):
    return like.dtype.type(value)


def out_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def unfold(x, fh, fw, stride, pad, fill):
    """x (N, C, H, W) -> (N*OH*OW, C*fh*fw), a row per output position, columns (C, fh, fw)."""
    n, c, h, w = x.shape
    oh, ow = out_size(h, fh, stride, pad), out_size(w, fw, stride, pad)
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], constant_values=fill)
    cols = np.empty((n, c, fh, fw, oh, ow), dtype=x.dtype)
    for i in range(fh):
        for j in range(fw):
            cols[:, :, i, j] = padded[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, -1)


def fold(cols, shape, fh, fw, stride, pad):
    """The adjoint of unfold: entries that came from one cell add up."""
    n, c, h, w = shape
    oh, ow = out_size(h, fh, stride, pad), out_size(w, fw, stride, pad)
    cols = cols.reshape(n, oh, ow, c, fh, fw).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(fh):
        for j in range(fw):
            img[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += cols[:, :, i, j]
    return img[:, :, pad:pad + h, pad:pad + w]


class Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x, **_):
        self.shape = x.shape
        self.x = x.reshape(x.shape[0], -1)
        return self.x @ self.W + self.b

    def backward(self, dout):
        self.grads = {"W": self.x.T @ dout, "b": dout.sum(axis=0)}
        return (dout @ self.W.T).reshape(self.shape)


class Relu:
    def forward(self, x, **_):
        self.mask = x <= 0
        y = x.copy()
        y[self.mask] = 0
        return y

    def backward(self, dout):
        dx = dout.copy()
        dx[self.mask] = 0
        return dx


class SoftmaxWithLoss:
    def forward(self, x, t=None, **_):
        shifted = x - x.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        self.y, self.t = e / e.sum(axis=-1, keepdims=True), t
        n = scalar(x.shape[0], x)
        eps = scalar(LOG_EPS, x)
        if t.dtype == np.int64:
            return -np.sum(np.log(self.y[np.arange(x.shape[0]), t] + eps)) / n
        return -np.sum(t * np.log(self.y + eps)) / n

    def backward(self, dout=None):
        dout = scalar(1.0, self.y) if dout is None else dout
        n = self.y.shape[0]
        if self.t.dtype == np.int64:
            dx = self.y.copy()
            dx[np.arange(n), self.t] -= 1
        else:
            dx = self.y - self.t
        return dx * dout / scalar(n, self.y)


class Dropout:
    """The mask is the server's (its own generator); tests recover it from y."""

    def __init__(self, ratio):
        self.ratio = ratio

    def forward(self, x, eval=False, mask=None, **_):
        self.eval = eval
        if eval:
            return x * scalar(1.0 - self.ratio, x)
        self.mask = mask
        return x * mask

    def backward(self, dout):
        if self.eval:
            return dout * scalar(1.0 - self.ratio, dout)
        return dout * self.mask


class BatchNorm:
    def __init__(self, gamma, beta, momentum=0.9, epsilon=1e-6):
        self.gamma, self.beta = gamma, beta
        self.momentum, self.epsilon = momentum, epsilon
        self.running_mean = np.zeros_like(gamma)
        self.running_var = np.zeros_like(gamma)

    def rows(self, x):
        if x.ndim == 4:
            return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
        return x

    def unrows(self, r):
        if len(self.shape) == 4:
            n, c, h, w = self.shape
            return r.reshape(n, h, w, c).transpose(0, 3, 1, 2)
        return r

    def forward(self, x, eval=False, **_):
        self.shape, self.eval = x.shape, eval
        r = self.rows(x)
        eps = scalar(self.epsilon, x)
        if eval:
            self.std = np.sqrt(self.running_var + eps)
            self.xn = (r - self.running_mean) / self.std
        else:
            mu = r.mean(axis=0)
            self.xc = r - mu
            var = np.mean(self.xc ** 2, axis=0)
            self.std = np.sqrt(var + eps)
            self.xn = self.xc / self.std
            m, one_m = scalar(self.momentum, x), scalar(1.0 - self.momentum, x)
            self.running_mean = m * self.running_mean + one_m * mu
            self.running_var = m * self.running_var + one_m * var
        return self.unrows(self.gamma * self.xn + self.beta)

    def backward(self, dout):
        d = self.rows(dout)
        self.grads = {"gamma": np.sum(self.xn * d, axis=0), "beta": d.sum(axis=0)}
        dxn = self.gamma * d
        if self.eval:
            return self.unrows(dxn / self.std)
        n = d.shape[0]
        dxc = dxn / self.std
        dstd = -np.sum((dxn * self.xc) / (self.std * self.std), axis=0)
        dvar = scalar(0.5, d) * dstd / self.std
        dxc = dxc + (scalar(2.0, d) / scalar(n, d)) * self.xc * dvar
        dmu = np.sum(dxc, axis=0)
        return self.unrows(dxc - dmu / scalar(n, d))


class Convolution:
    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b, self.stride, self.pad = W, b, stride, pad

    def forward(self, x, **_):
        fn, c, fh, fw = self.W.shape
        n, _, h, w = x.shape
        oh, ow = out_size(h, fh, self.stride, self.pad), out_size(w, fw, self.stride, self.pad)
        self.shape = x.shape
        self.cols = unfold(x, fh, fw, self.stride, self.pad, 0.0)
        self.W2 = self.W.reshape(fn, -1).T
        return (self.cols @ self.W2 + self.b).reshape(n, oh, ow, fn).transpose(0, 3, 1, 2)

    def backward(self, dout):
        fn, c, fh, fw = self.W.shape
        d = dout.transpose(0, 2, 3, 1).reshape(-1, fn)
        self.grads = {"W": (self.cols.T @ d).T.reshape(fn, c, fh, fw), "b": d.sum(axis=0)}
        return fold(d @ self.W2.T, self.shape, fh, fw, self.stride, self.pad)


class Pooling:
    def __init__(self, ph, pw, stride=None, pad=0):
        self.ph, self.pw, self.pad = ph, pw, pad
        self.stride = ph if stride is None else stride

    def forward(self, x, **_):
        n, c, h, w = x.shape
        oh, ow = out_size(h, self.ph, self.stride, self.pad), out_size(w, self.pw, self.stride, self.pad)
        cols = unfold(x, self.ph, self.pw, self.stride, self.pad, -np.inf).reshape(-1, self.ph * self.pw)
        self.shape = x.shape
        self.winner = np.argmax(cols, axis=1)
        return cols[np.arange(cols.shape[0]), self.winner].reshape(n, oh, ow, c).transpose(0, 3, 1, 2)

    def backward(self, dout):
        d = dout.transpose(0, 2, 3, 1)
        spread = np.zeros((d.size, self.ph * self.pw), dtype=dout.dtype)
        spread[np.arange(d.size), self.winner] = d.reshape(-1)
        return fold(spread.reshape(d.shape[0] * d.shape[1] * d.shape[2], -1), self.shape,
                    self.ph, self.pw, self.stride, self.pad)


class Sequential:
    def __init__(self, named):
        self.named = named

    def forward(self, x, t=None, eval=False):
        for _, layer in self.named:
            if isinstance(layer, SoftmaxWithLoss):
                return x if t is None else layer.forward(x, t=t)  # without t: the scores
            x = layer.forward(x, eval=eval)
        return x

    def backward(self, dout=None):
        for _, layer in reversed(self.named):
            dout = layer.backward(dout)
        return dout

    def grads(self):
        return {f"{name}.{k}": v for name, layer in self.named for k, v in getattr(layer, "grads", {}).items()}


# Optimizers: elementwise in the parameter's dtype, left to right as written, scalars rounded
# to that dtype first; Adam's lr_t in float64 (Python floats), then rounded.
OPT_EPS = 1e-7


class SGD:
    def __init__(self, lr=0.01):
        self.lr = lr

    def update(self, params, grads):
        for k, p in params.items():
            p -= scalar(self.lr, p) * grads[k]


class Momentum:
    def __init__(self, lr=0.01, momentum=0.9):
        self.lr, self.momentum, self.v = lr, momentum, {}

    def update(self, params, grads):
        for k, p in params.items():
            v = self.v.setdefault(k, np.zeros_like(p))
            v[...] = scalar(self.momentum, p) * v - scalar(self.lr, p) * grads[k]
            p += v


class AdaGrad:
    def __init__(self, lr=0.01):
        self.lr, self.h = lr, {}

    def update(self, params, grads):
        for k, p in params.items():
            g = grads[k]
            h = self.h.setdefault(k, np.zeros_like(p))
            h += g * g
            p -= scalar(self.lr, p) * g / (np.sqrt(h) + scalar(OPT_EPS, p))


class Adam:
    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter, self.m, self.v = 0, {}, {}

    def update(self, params, grads):
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2 ** self.iter) / (1.0 - self.beta1 ** self.iter)
        for k, p in params.items():
            g = grads[k]
            m = self.m.setdefault(k, np.zeros_like(p))
            v = self.v.setdefault(k, np.zeros_like(p))
            m += scalar(1.0 - self.beta1, p) * (g - m)
            v += scalar(1.0 - self.beta2, p) * (g ** 2 - v)
            p -= scalar(lr_t, p) * m / (np.sqrt(v) + scalar(OPT_EPS, p))

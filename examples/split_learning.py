"""Split learning: the client keeps the bottom of the network, the server the top and the loss.

The classic two-layer network on scikit-learn's digits, float64, cut after the first layer:

    client (numpy):  h = relu(x · W1 + b1)                         — the raw data never leaves
    server (layerd): loss = softmax_with_loss(h · W2 + b2, t)      — its own SGD updates W2, b2

Per step one TrainStep sends h and the labels, and answers the loss and dloss/dh
(return_dx); the client back-propagates dh through its layer and updates W1, b1 with the same
SGD. The result is the same network trained in one process (a test checks the loss curve).

    pip install ./clients/python scikit-learn
    cargo run --release --bin layerd &
    python examples/split_learning.py [--addr 127.0.0.1:50051] [--steps 500]
"""
import argparse

import numpy as np

from train_digits import BATCH, CLASSES, HIDDEN, LR, batches, digits, initial_weights


class Bottom:
    """The client's half: affine 64→HIDDEN and relu, with its own SGD (p -= lr * g)."""

    def __init__(self, W, b):
        self.W, self.b = W.copy(), b.copy()

    def forward(self, x):
        self.x = x
        z = x @ self.W + self.b
        self.mask = z <= 0
        h = z.copy()
        h[self.mask] = 0
        return h

    def backward_and_update(self, dh):
        dz = dh.copy()
        dz[self.mask] = 0
        dW, db = self.x.T @ dz, dz.sum(axis=0)
        self.W -= LR * dW
        self.b -= LR * db


def train(client, steps):
    """Trains split in two; answers the loss of every step and (correct, total) on the test set."""
    (x, t), (x_test, t_test) = digits()
    w = initial_weights()
    bottom = Bottom(w["fc1.W"], w["fc1.b"])
    with client.session() as s:
        top = s.sequential([("fc2", "affine", {"in_features": HIDDEN, "out_features": CLASSES}),
                            ("loss", "softmax_with_loss")],
                           params={"fc2.W": w["fc2.W"], "fc2.b": w["fc2.b"]}, dtype=np.float64)
        sgd = s.optimizer("sgd", lr=LR, layers=[top])
        losses = []
        for rows in batches(len(x), steps):
            h = bottom.forward(x[rows])
            loss, dh = top.train_step(h, t[rows], sgd, return_dx=True)
            bottom.backward_and_update(dh)
            losses.append(loss)
        scores = top.forward(bottom.forward(x_test), no_grad=True)
    correct = int(np.sum(np.argmax(scores, axis=1) == t_test))
    return losses, correct, len(t_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="print the loss every this many steps")
    args = parser.parse_args()
    import layerd
    layerd.tune_malloc()  # x goes up and dx comes down every step: reuse freed blocks

    losses, correct, total = train(layerd.Client(args.addr), args.steps)
    for step in range(0, len(losses), args.every):
        print(f"step {step:5d}  loss {losses[step]:.12f}")
    print(f"test accuracy {correct / total:.4f} ({correct}/{total}); batch {BATCH}")


if __name__ == "__main__":
    main()

"""Train the classic two-layer network on the server: affine 64→50, relu, affine 50→10,
softmax_with_loss, on scikit-learn's bundled 8×8 digits, in float64, with the server's SGD.

The client draws the initial weights from numpy's seeded generator and the batches of 100, and
sends one TrainStep per step; the server runs Forward, Backward and the update. It prints the
loss every 50 steps and the test accuracy.

    pip install ./clients/python scikit-learn
    cargo run --release --bin layerd &          # listens on 127.0.0.1:50051
    python examples/train_digits.py [--addr 127.0.0.1:50051] [--steps 1000] [--every 50]
"""
import argparse

import numpy as np

HIDDEN, CLASSES, BATCH, LR, SEED = 50, 10, 100, 0.5, 0


def digits(seed=SEED):
    """The 1,797 digits, pixels scaled to [0, 1], split 1,500 for training and the rest for test."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x, t = data.data / 16.0, data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, t = x[order], t[order]
    return (x[:1500], t[:1500]), (x[1500:], t[1500:])


def initial_weights(seed=SEED):
    """The book's TwoLayerNet initialization: weights 0.01 · N(0, 1), biases 0."""
    rng = np.random.default_rng(seed + 1)
    return {"fc1.W": 0.01 * rng.standard_normal((64, HIDDEN)), "fc1.b": np.zeros(HIDDEN),
            "fc2.W": 0.01 * rng.standard_normal((HIDDEN, CLASSES)), "fc2.b": np.zeros(CLASSES)}


def batches(n, steps, seed=SEED):
    """The row indices of each step's batch: BATCH rows drawn without replacement."""
    rng = np.random.default_rng(seed + 2)
    return [rng.choice(n, BATCH, replace=False) for _ in range(steps)]


def train(client, steps):
    """Trains remotely; answers the loss of every step, and how many test digits it then
    classifies right, of how many."""
    (x, t), (x_test, t_test) = digits()
    with client.session() as s:
        net = s.sequential([("fc1", "affine", {"in_features": 64, "out_features": HIDDEN}),
                            ("relu", "relu"),
                            ("fc2", "affine", {"in_features": HIDDEN, "out_features": CLASSES}),
                            ("loss", "softmax_with_loss")], params=initial_weights(), dtype=np.float64)
        sgd = s.optimizer("sgd", lr=LR, layers=[net])
        losses = [net.train_step(x[rows], t[rows], sgd) for rows in batches(len(x), steps)]
        scores = net.forward(x_test, eval=True, no_grad=True)
        correct = int(np.sum(np.argmax(scores, axis=1) == t_test))
    return losses, correct, len(t_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="print the loss every this many steps")
    args = parser.parse_args()
    import layerd  # here, so the data helpers above import without the client

    losses, correct, total = train(layerd.Client(args.addr), args.steps)
    for step in range(0, len(losses), args.every):
        print(f"step {step:5d}  loss {losses[step]:.12f}")
    print(f"step {len(losses) - 1:5d}  loss {losses[-1]:.12f}")
    print(f"test accuracy {correct / total:.4f} ({correct}/{total})")


if __name__ == "__main__":
    main()

"""Train a small convolutional network on the server, with a checkpoint and a resume halfway:
convolution → batch_norm → relu → pooling → affine → dropout → affine → softmax_with_loss on
scikit-learn's 8×8 digits, float32, the server's Adam, one TrainStep per batch of 100.

Halfway through, the session is saved to a file (layerd.save), closed, and loaded into a new
session (layerd.load), which trains on: parameters, batch-norm statistics, Adam's state and the
dropout generator all come back, so the run is the same as one without the break. It prints the
loss and the test accuracy (about 98 % after 600 steps).

    pip install ./clients/python scikit-learn
    cargo run --release --bin layerd &
    python examples/train_convnet.py [--addr 127.0.0.1:50051] [--steps 600]
"""
import argparse
import os
import tempfile

import numpy as np

BATCH, SEED = 100, 0
NET = [("conv", "convolution", {"in_channels": 1, "out_channels": 16, "kernel_h": 3, "kernel_w": 3, "pad": 1,
                                 "seed": 1}),
       ("bn", "batch_norm", {"num_features": 16}),
       ("relu", "relu"),
       ("pool", "pooling", {"pool_h": 2, "pool_w": 2}),
       ("fc1", "affine", {"in_features": 16 * 4 * 4, "out_features": 64, "seed": 2}),
       ("drop", "dropout", {"ratio": 0.3, "seed": 3}),
       ("fc2", "affine", {"in_features": 64, "out_features": 10, "seed": 4}),
       ("loss", "softmax_with_loss")]


def digits(seed=SEED):
    """The digits as (N, 1, 8, 8) float32 in [0, 1]: 1,500 to train on, 297 to test."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    t = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    return (x[order[:1500]], t[order[:1500]]), (x[order[1500:]], t[order[1500:]])


def train(client, steps, checkpoint_dir):
    """Trains remotely with a save/load halfway; answers the losses and (correct, total)."""
    import layerd
    (x, t), (x_test, t_test) = digits()
    rng = np.random.default_rng(SEED + 1)
    batches = [rng.choice(len(x), BATCH, replace=False) for _ in range(steps)]
    path = os.path.join(checkpoint_dir, "convnet.safetensors")
    losses = []
    with client.session() as s:
        net = s.sequential(NET, layer_id="net", dtype=np.float32)
        adam = s.optimizer("adam", lr=0.01, optimizer_id="adam", layers=[net])
        for rows in batches[:steps // 2]:
            losses.append(net.train_step(x[rows], t[rows], adam))
        layerd.save(s, path)
    with layerd.load(client, path) as s:
        net, adam = s.get_layer("net"), s.get_optimizer("adam")
        for rows in batches[steps // 2:]:
            losses.append(net.train_step(x[rows], t[rows], adam))
        scores = net.forward(x_test, eval=True, no_grad=True)
    correct = int(np.sum(np.argmax(scores, axis=1) == t_test))
    return losses, correct, len(t_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    import layerd
    with tempfile.TemporaryDirectory() as checkpoints:
        losses, correct, total = train(layerd.Client(args.addr), args.steps, checkpoints)
    for step in range(0, len(losses), 50):
        print(f"step {step:5d}  loss {losses[step]:.6f}")
    print(f"step {len(losses) - 1:5d}  loss {losses[-1]:.6f}")
    print(f"test accuracy {correct / total:.4f} ({correct}/{total})")


if __name__ == "__main__":
    main()

